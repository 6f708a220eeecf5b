"""The layer-wise table (pipeline/evaluation/report/layers.py): every block of a model scored with
the quick checks on a quick set, then the table and its plot."""

import csv
import json

import numpy as np
import pytest
import torch
from eval_testutil import separable_task

from dasheng_model.checkpoint import save_checkpoint
from dasheng_model.encoder import DashengEncoder
from dasheng_pipeline.common import quick_checks
from dasheng_pipeline.evaluation.report import layers
from dasheng_pipeline.evaluation.tasks import quick_sets


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("quick")
    task = separable_task(root / "task")
    arrays = quick_sets.build(task, max_clips=512, max_seconds=10.0, seed=0)
    path = root / "separable.npz"
    quick_checks.save_quick_set(path, arrays, {"seed": 0})
    return path


def test_quick_scores_and_the_layer_table(quick, tmp_path):
    logmel = layers.score(quick, "logmel", {"spec": "logmel", "layer": None}, seed=0, k=10)
    assert [(r["layer"], r["method"]) for r in logmel["rows"]] == [(0, "knn"), (0, "linear")]
    assert all(r["score"] >= 0.9 for r in logmel["rows"])  # the classes differ in spectrum
    torch.manual_seed(0)
    ckpt = save_checkpoint(DashengEncoder("tiny"), tmp_path / "tiny.safetensors", seed=0)
    spec = {"spec": str(ckpt), "layer": "mean"}
    enc = layers.score(quick, "trained", spec, seed=0, k=10)
    assert [(r["layer"], r["method"]) for r in enc["rows"]] == [
        (k, m) for k in range(1, 7) for m in ("knn", "linear")
    ]
    assert all(0.0 <= r["score"] <= 1.0 for r in enc["rows"])
    files = []
    for name, result in (("logmel", logmel), ("trained", enc)):
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps(result))
    rows = layers.table([str(f) for f in files], tmp_path / "results", tmp_path / "layers.png", 0)
    assert len(rows) == 14
    md = (tmp_path / "results/layers.md").read_text()
    assert "| layer | logmel knn | logmel linear | trained knn | trained linear |" in md
    assert "| 6 |" in md and "| 0 |" in md
    with open(tmp_path / "results/layers.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 14
    assert (tmp_path / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_specs_take_a_layer():
    from dasheng_model.embed import embed
    from dasheng_pipeline.evaluation.embeddings import build_embedder

    emb = build_embedder({"spec": "random:tiny:0", "layer": "2"})
    assert emb.layer == 2 and emb.description.endswith(", layer 2")
    x = (0.1 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32)
    ((frames, _, clip),) = emb([x])
    np.testing.assert_allclose(
        clip, embed(emb.encoder, torch.from_numpy(x)[None], layer=2).clip[0].numpy(), atol=1e-6
    )
    with pytest.raises(ValueError, match="block number 1..6"):
        build_embedder({"spec": "random:tiny", "layer": 9})
    with pytest.raises(ValueError, match="log-mel baseline has no layers"):
        build_embedder({"spec": "logmel", "layer": "mean"})
