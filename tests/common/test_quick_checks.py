"""The quick checks (pipeline/common/quick_checks.py): the quick-set format, the k-NN and linear
scores by hand, the checks during training (rows, resume) and their figure."""

import numpy as np
import pytest
import torch

from dasheng_model.encoder import DashengEncoder
from dasheng_pipeline.common import quick_checks


def toy_set(path, n=24):
    """A two-class quick set: quiet vs loud low mel bins, the first two thirds train."""
    rng = np.random.default_rng(0)
    label = np.arange(n) % 2
    mel = rng.normal(-40, 5, (n, 64, 101))
    mel[label == 1, :16] += 20
    arrays = {
        "name": np.array("toy"),
        "mel": mel.astype(np.float16),
        "valid_frames": np.full(n, 101, np.int64),
        "label": label,
        "train": np.arange(n) < 2 * n // 3,
        "classes": np.array(["quiet", "loud"]),
    }
    quick_checks.save_quick_set(path, arrays, {"seed": 0})
    return path


def test_the_format_round_trips_and_a_bad_file_names_itself(tmp_path):
    t = quick_checks.load_quick_set(toy_set(tmp_path / "toy.npz"))
    assert (t.name, t.classes, t.mel.shape, int(t.train.sum())) == (
        "toy",
        ["quiet", "loud"],
        (24, 64, 101),
        16,
    )
    np.savez(tmp_path / "partial.npz", name=np.array("x"), mel=np.zeros((1, 64, 4)))
    with pytest.raises(
        quick_checks.QuickSetError,
        match=r"partial.npz: a quick set needs the arrays \['classes', 'label', 'train', 'valid_frames'\]",
    ):
        quick_checks.load_quick_set(tmp_path / "partial.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(quick_checks.QuickSetError, match="junk.npz: not a readable quick set"):
        quick_checks.load_quick_set(tmp_path / "junk.npz")


def test_quick_scores_by_hand():
    x = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [1, 0.05], [0.05, 1]], np.float32)
    y = np.array([0, 0, 1, 1, 0, 1])
    train = np.array([True, True, True, True, False, False])
    assert quick_checks.quick_scores(x, y, train, k=1) == {"knn": 1.0, "linear": 1.0}
    with pytest.raises(ValueError, match="2 classes or more"):
        quick_checks.quick_scores(x, np.zeros(6, int), train, k=1)


def test_the_checks_during_training_rows_resume_and_curve(tmp_path):
    path = toy_set(tmp_path / "toy.npz")
    torch.manual_seed(0)
    mae_like = torch.nn.Module()
    mae_like.encoder = DashengEncoder("tiny").eval()
    cfg = {
        "epochs": 3,
        "quick_checks": {"every_epochs": 2, "tasks": ["toy"], "k": 10, "layers": "last"},
        "quick_sets": [str(path)],
    }
    check = quick_checks.QuickChecks(cfg, tmp_path, start_epoch=0)
    assert [check.due(e) for e in range(3)] == [False, True, True]  # every 2 epochs and the last
    assert check.after_epoch(mae_like, 0, 4) == []
    for epoch in (1, 2):
        check.after_epoch(mae_like, epoch, 4 * (epoch + 1))
    rows = quick_checks.read_rows(tmp_path / "quick_checks.csv")
    assert [(r["epoch"], r["step"], r["layer"], r["method"]) for r in rows] == [
        ("1", "8", "6", "knn"),
        ("1", "8", "6", "linear"),
        ("2", "12", "6", "knn"),
        ("2", "12", "6", "linear"),
    ]
    # a resumed run from epoch 2 drops the rows of the epochs it redoes
    quick_checks.QuickChecks(cfg, tmp_path, start_epoch=2)
    assert [r["epoch"] for r in quick_checks.read_rows(tmp_path / "quick_checks.csv")] == ["1", "1"]
    quick_checks.quick_checks_curve(
        tmp_path / "quick_checks.csv", tmp_path / "curve.png", {"seed": 0}
    )
    assert (tmp_path / "curve.png").stat().st_size > 5000
    # no checks: no sets are read, nothing is due, and the figure says how to turn them on
    off = {**cfg, "quick_checks": {**cfg["quick_checks"], "every_epochs": 0}, "quick_sets": []}
    assert not quick_checks.QuickChecks(off, tmp_path / "off", 0).due(2)
    quick_checks.quick_checks_curve(
        tmp_path / "off/quick_checks.csv", tmp_path / "off.png", {"seed": 0}
    )
    assert (tmp_path / "off.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
