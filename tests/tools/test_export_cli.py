"""``dasheng-pipeline export``: the command line over dasheng_model.export (the formats themselves
are tested in tests/model/test_model_export.py)."""

from __future__ import annotations

import json

import torch

from dasheng_model.pretrained import load, random_encoder
from dasheng_pipeline import cli


def test_export_writes_each_format_with_the_pipelines_stamp(tmp_path, capsys):
    official = tmp_path / "tiny.pt"
    assert cli.main(["export", "random:tiny:2", "--to", "official", "--out", str(official)]) == 0
    hf = tmp_path / "hf"
    assert cli.main(["export", str(official), "--to", "hf", "--out", str(hf), "-q"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{official}: random:tiny:2 written as official"
    ]

    expected = random_encoder("tiny", 2).state_dict()
    got = load(hf).state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    stamp = json.loads((hf / "config.json").read_text())["dasheng_pipeline"]["provenance"]
    assert stamp["git_sha"] and "torchaudio" in stamp["versions"]  # the pipeline's own stamp
    assert stamp["source"]["model"] == str(official)
    assert stamp["source"]["provenance"]["source"]["model"] == "random:tiny:2"

    assert cli.main(["inspect", str(hf), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["hf_config"]["dasheng_pipeline"]["provenance"] == stamp


def test_export_errors_are_one_line(tmp_path, capsys):
    missing = tmp_path / "missing.pt"
    assert cli.main(["export", str(missing), "--to", "hf", "--out", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: model ") and "missing.pt" in err
    assert not (tmp_path / "hf").exists()
