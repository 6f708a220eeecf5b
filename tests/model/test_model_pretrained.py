"""dasheng_model.pretrained: one resolver for every way to name weights, and the Hugging Face format."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from dasheng_model.checkpoint import CheckpointError, save_checkpoint
from dasheng_model.pretrained import (
    dasheng_base,
    load,
    load_hf,
    parse_random,
    random_encoder,
    save_hf,
    weights_sha256,
)


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_format_of_the_same_weights_loads_the_same_encoder(tmp_path):
    encoder = random_encoder("tiny", 2)
    official = tmp_path / "tiny.pt"
    torch.save({"model": encoder.state_dict(), "config": {}}, official)
    ours = save_checkpoint(encoder, tmp_path / "tiny.safetensors")
    hf = save_hf(encoder, tmp_path / "hf")
    keys = load_file(str(hf / "model.safetensors")).keys()
    assert all(k.startswith("encoder.") for k in keys) and not any(
        k.startswith("encoder.front_end") for k in keys
    )
    assert json.loads((hf / "config.json").read_text())["encoder_kwargs"] == {
        "embed_dim": 192,
        "depth": 6,
        "num_heads": 3,
    }
    for spec in (official, ours, hf, hf / "model.safetensors", "random:tiny:2"):
        assert _same(load(spec), encoder), spec
    assert (
        weights_sha256("random:tiny:2")
        == weights_sha256("random:tiny:2", encoder)
        != weights_sha256("random:tiny")
    )
    assert weights_sha256(hf) == hashlib.sha256((hf / "model.safetensors").read_bytes()).hexdigest()


def test_hugging_face_folders_with_a_head_or_without_config(tmp_path, caplog):
    encoder = random_encoder("tiny", 3)
    hf = save_hf(encoder, tmp_path / "hf")
    tensors = load_file(str(hf / "model.safetensors"))
    save_file({**tensors, "outputlayer.weight": torch.zeros(2, 192)}, str(hf / "model.safetensors"))
    (hf / "config.json").unlink()  # the size then comes from the shapes
    with caplog.at_level("INFO", logger="dasheng_model.pretrained"):
        assert _same(load_hf(hf), encoder)
    assert "left out 1 keys outside the encoder (outputlayer.weight" in caplog.text
    (hf / "config.json").write_text('{"encoder_kwargs": {"embed_dim": 192}}')
    with pytest.raises(
        CheckpointError, match="config.json: expected a JSON object with encoder_kwargs"
    ):
        load_hf(hf)


def test_bad_names_are_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match=r"unknown size 'huge'"):
        parse_random("random:huge")
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="a folder without model.safetensors"):
        load(tmp_path)
    ours = save_checkpoint(random_encoder("tiny"), tmp_path / "tiny.safetensors")
    with pytest.raises(CheckpointError, match="holds size tiny, not 'base'"):
        dasheng_base(weights=ours)


def _load_from_hub(repo_id: str, hub, home) -> subprocess.CompletedProcess:
    code = (
        "import sys; from dasheng_model.pretrained import load, weights_sha256; e = load(sys.argv[1]); "
        "print(e.config.embed_dim, weights_sha256(sys.argv[1], e))"
    )
    env = {**os.environ, **hub.env(home)}
    env.pop("HF_HUB_OFFLINE", None)
    return subprocess.run(
        [sys.executable, "-c", code, repo_id], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.mark.network
def test_a_repo_id_is_fetched_from_the_hub_and_a_failure_is_one_line(tmp_path):
    """huggingface_hub against a loopback server standing in for the hub (no internet)."""
    from loopback import Hub

    encoder = random_encoder("tiny", 4)
    hf = save_hf(encoder, tmp_path / "hf")
    with Hub() as hub:
        files = {name: (hf / name).read_bytes() for name in ("model.safetensors", "config.json")}
        hub.add("models", "mispeech/dasheng-test", files)
        ok = _load_from_hub("mispeech/dasheng-test", hub, tmp_path / "home")
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.split() == ["192", weights_sha256("random:tiny:4", encoder)]
        missing = _load_from_hub("mispeech/absent", hub, tmp_path / "home2")
    assert missing.returncode == 1
    last = missing.stderr.strip().splitlines()[-1]
    assert (
        "model 'mispeech/absent': not a local path, and fetching it from the Hugging Face hub failed"
        in last
    )
