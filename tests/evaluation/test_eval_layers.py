"""Quick sets, the quick k-NN + linear probe and the layer-wise table (pipeline/evaluation/quickset.py,
layers.py; pipeline/training/downstream.py)."""

import csv
import json

import numpy as np
import pytest
import torch
from eval_testutil import separable_task, write_task

from dasheng_model.checkpoint import save_checkpoint
from dasheng_model.encoder import DashengEncoder
from dasheng_pipeline.evaluation import hear_tasks, layers, quickset
from dasheng_pipeline.training import downstream


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("quick")
    task = separable_task(root / "task")
    arrays = quickset.build(task, max_clips=512, max_seconds=10.0, seed=0)
    path = root / "separable.npz"
    np.savez(path, **arrays)
    return root, path


def test_quick_set_holds_the_first_split_as_log_mel(quick):
    _, path = quick
    t = downstream.load_quick_task(path)
    assert t.name == "separable" and t.classes == ["low", "high", "noise"]
    # separable_task: per class 12 clips, dealt 6 train / 2 valid / 4 test of every 12
    assert t.mel.shape == (36, 64, 51) and t.mel.dtype == np.float16
    assert int(t.train.sum()) == 24 and np.bincount(t.label[~t.train]).tolist() == [4, 4, 4]
    assert t.valid_frames.tolist() == [51] * 36  # 0.5 s: 8000 // 160 + 1


def test_quick_scores_and_the_layer_table(quick, tmp_path):
    root, path = quick
    logmel = layers.score(path, "logmel", {"spec": "logmel", "layer": None})  # as the DAG passes it
    assert [(r["layer"], r["method"]) for r in logmel["rows"]] == [(0, "knn"), (0, "linear")]
    assert all(r["score"] >= 0.9 for r in logmel["rows"])  # the classes differ in spectrum
    torch.manual_seed(0)
    ckpt = save_checkpoint(DashengEncoder("tiny"), tmp_path / "tiny.safetensors", seed=0)
    enc = layers.score(path, "trained", {"spec": str(ckpt), "layer": "mean"})
    assert [(r["layer"], r["method"]) for r in enc["rows"]] == [
        (k, m) for k in range(1, 7) for m in ("knn", "linear")
    ]
    assert all(0.0 <= r["score"] <= 1.0 for r in enc["rows"])
    files = []
    for name, result in (("logmel", logmel), ("trained", enc)):
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps(result))
    rows = layers.table([str(f) for f in files], tmp_path / "results", tmp_path / "layers.png")
    assert len(rows) == 14
    md = (tmp_path / "results/layers.md").read_text()
    assert "| layer | logmel knn | logmel linear | trained knn | trained linear |" in md
    assert "| 6 |" in md and "| 0 |" in md
    with open(tmp_path / "results/layers.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 14
    assert (tmp_path / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_scores_by_hand():
    x = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [1, 0.05], [0.05, 1]], np.float32)
    y = np.array([0, 0, 1, 1, 0, 1])
    train = np.array([True, True, True, True, False, False])
    assert downstream.quick_scores(x, y, train, k=1) == {"knn": 1.0, "linear": 1.0}
    with pytest.raises(ValueError, match="2 classes or more"):
        downstream.quick_scores(x, np.zeros(6, int), train)


def test_an_event_task_is_refused_by_name(tmp_path):
    task = write_task(
        tmp_path / "ev",
        {"train": {"a.wav": []}, "valid": {"b.wav": []}, "test": {"c.wav": []}},
        ["beep"],
        embedding_type="event",
        prediction_type="multilabel",
        name="evtask",
        evaluation=("event_onset_200ms_fms",),
    )
    with pytest.raises(hear_tasks.TaskError, match="'evtask'.*needs a multiclass scene task"):
        quickset.build(task)


def test_downstream_check_rows_and_curve(quick, tmp_path):
    _, path = quick
    torch.manual_seed(0)
    mae_like = torch.nn.Module()
    mae_like.encoder = DashengEncoder("tiny").eval()
    cfg = {
        "epochs": 3,
        "downstream": {"every_epochs": 2, "k": 10, "layers": "last"},
        "downstream_sets": [str(path)],
    }
    check = downstream.DownstreamCheck(cfg, tmp_path, start_epoch=0)
    assert [check.due(e) for e in range(3)] == [False, True, True]  # every 2 epochs and the last
    assert check.after_epoch(mae_like, 0, 4) == []
    for epoch in (1, 2):
        check.after_epoch(mae_like, epoch, 4 * (epoch + 1))
    rows = downstream.read_rows(tmp_path / "downstream.csv")
    assert [(r["epoch"], r["step"], r["layer"], r["method"]) for r in rows] == [
        ("1", "8", "6", "knn"),
        ("1", "8", "6", "linear"),
        ("2", "12", "6", "knn"),
        ("2", "12", "6", "linear"),
    ]
    # a resumed run from epoch 2 drops the rows of the epochs it redoes
    downstream.DownstreamCheck(cfg, tmp_path, start_epoch=2)
    assert [r["epoch"] for r in downstream.read_rows(tmp_path / "downstream.csv")] == ["1", "1"]
    downstream.downstream_curve(tmp_path / "downstream.csv", tmp_path / "curve.png", {"seed": 0})
    assert (tmp_path / "curve.png").stat().st_size > 5000


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
