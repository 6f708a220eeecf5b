"""X-ARES: our encoder class, task reader and protocols, checked against X-ARES's own code
(PyPI ``xares`` 0.1.3, a test-only dependency like the official ``dasheng`` package).

The task is generated here: three classes of synthesised 1 s sounds (tones in three frequency
bands over noise), written as X-ARES webdataset shards in both layouts (3 folds, and
train/valid/test), read by ``xares_tasks``, embedded with a random-init ``tiny`` encoder; X-ARES's
``KNNTrainer`` and ``Trainer`` then run on exactly those embeddings (fed as its loaders' batches).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dasheng_model.hear import random_encoder
from dasheng_model.xares import XaresDashengEncoder
from dasheng_pipeline import plan
from dasheng_pipeline.evaluation import embeddings
from dasheng_pipeline.evaluation.protocols import xares as xares_protocols
from dasheng_pipeline.evaluation.tasks import demo as demo_tasks
from dasheng_pipeline.evaluation.tasks import xares as xares_tasks
from dasheng_pipeline.evaluation.tasks.hear import load_task

xares_checker = pytest.importorskip(
    "xares.audio_encoder_checker", reason="xares (dev extra) is not installed"
)
xares_trainer = pytest.importorskip("xares.trainer", reason="xares (dev extra) is not installed")

CLASSES = ("low", "mid", "high")
BANDS = {
    "low": (300, 900),
    "mid": (600, 1800),
    "high": (1200, 3600),
}  # overlapping: k-NN is not trivially right
PER_CLASS_PER_SPLIT = 8
SEED = 42


def _clip(rng: np.random.Generator, label: str) -> bytes:
    t = np.arange(16000) / 16000
    f = rng.uniform(*BANDS[label])
    x = 0.2 * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)) + 0.1 * rng.standard_normal(
        t.size
    )
    return demo_tasks.wav_bytes(x)


def _samples(rng, split: str) -> list:
    return [
        (f"{split}_{label}_{i}", "wav", _clip(rng, label), {"sound": label})
        for i in range(PER_CLASS_PER_SPLIT)
        for label in CLASSES
    ]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """Both layouts converted and embedded: {layout: (task_dir, emb_dir)}."""
    root = tmp_path_factory.mktemp("xares")
    rng = np.random.default_rng(0)
    for fold in (1, 2, 3):
        xares_tasks.write_shards(
            _samples(rng, f"f{fold}"), root / "folds" / f"wds-audio-fold-{fold}-*.tar", per_shard=8
        )
    for split in ("train", "valid", "test"):
        xares_tasks.write_shards(_samples(rng, split), root / "split" / f"wds-audio-{split}-*.tar")
    configs = {
        "folds": {"path": str(root / "folds"), "label": "sound", "folds": [1, 2, 3]},
        "split": {
            "path": str(root / "split"),
            "label": "sound",
            "splits": {
                "train": "wds-audio-train",
                "valid": "wds-audio-valid",
                "test": "wds-audio-test",
            },
        },
    }
    out = {}
    for layout, cfg in configs.items():
        task_dir, emb_dir = root / "tasks" / layout, root / "emb" / layout
        xares_tasks.convert(xares_tasks.XaresSpec.from_config(f"synth_{layout}", cfg), task_dir, 0)
        embeddings.run(task_dir, "random", "random:tiny:0", {"seed": 0}, emb_dir)
        out[layout] = (task_dir, emb_dir)
    return out


def test_xares_checker_accepts_our_encoder():
    encoder = XaresDashengEncoder(random_encoder("tiny"))
    assert xares_checker.check_audio_encoder(encoder)
    assert (encoder.output_dim, encoder.sampling_rate, encoder.hop_size_in_ms) == (192, 16000, 40)
    import dasheng_model.xares

    # X-ARES builds the one class whose name ends in "Encoder" with no arguments
    assert [n for n in dir(dasheng_model.xares) if n.endswith("Encoder")] == ["XaresDashengEncoder"]
    wav = 0.1 * torch.randn(1, 16000 * 25)
    with (
        torch.no_grad()
    ):  # (the encoder's CPU inference path; with gradients another summation order)
        assert torch.equal(
            encoder(wav), encoder.model(wav)
        )  # chunked inside, same frames as one call


def test_reader_layouts_and_rotation(tasks):
    folds = load_task(tasks["folds"][0])
    assert folds.splits == ["fold1", "fold2", "fold3"] and folds.vocabulary == sorted(CLASSES)
    assert folds.metadata["xares"]["weight"] == 3 * PER_CLASS_PER_SPLIT  # the test fold's size
    rotation = xares_protocols.xares_folds(folds)
    assert [(f.train, f.valid, f.test) for f in rotation][0] == (
        ("fold2", "fold3"),
        ("fold1",),
        ("fold1",),
    )
    split = load_task(tasks["split"][0])
    assert [(f.train, f.valid, f.test) for f in xares_protocols.xares_folds(split)] == [
        (("train",), ("valid",), ("test",))
    ]
    assert sum(len(split.split_labels(s)) for s in split.splits) == 9 * PER_CLASS_PER_SPLIT


def _batches(task, emb_dir, splits, batch_size=32, shuffle_seed=None):
    """X-ARES loader batches ((x (B, D, T), lengths), y, keys) from our stored frames."""
    items = []
    for split in splits:
        arr = embeddings.load_split(emb_dir, split)
        labels = task.split_labels(split)
        for i, f in enumerate(arr["files"]):
            a, b = arr["offsets"][i], arr["offsets"][i + 1]
            items.append(
                (
                    torch.from_numpy(arr["frames"][a:b]).T,
                    task.label_index[labels[str(f)][0]],
                    str(f),
                )
            )

    class Loader:
        def __init__(self):
            self.rng = np.random.default_rng(shuffle_seed)

        def __iter__(self):
            order = (
                self.rng.permutation(len(items)) if shuffle_seed is not None else range(len(items))
            )
            chosen = [items[j] for j in order]
            for s in range(0, len(chosen), batch_size):
                part = chosen[s : s + batch_size]
                T = max(x.shape[1] for x, _, _ in part)
                x = torch.zeros(len(part), part[0][0].shape[0], T)
                for j, (e, _, _) in enumerate(part):
                    x[j, :, : e.shape[1]] = e
                yield (
                    (x, torch.tensor([e.shape[1] for e, _, _ in part])),
                    [y for _, y, _ in part],
                    [k for *_, k in part],
                )

    return Loader()


def run_protocol(protocol: str, task_dir, emb_dir) -> dict:
    """An X-ARES protocol as its job runs it, with the schema's settings (X-ARES 0.1.3's)."""
    x = plan.read_config(None)["evaluation"]["xares"]
    params = {"seed": SEED, "xares": x}
    return xares_protocols.run(protocol, task_dir, emb_dir, SEED, x["mlp"], x["knn"], 1, params)


@pytest.mark.parametrize("layout", ["folds", "split"])
def test_knn_equals_xares_knn(tasks, layout):
    task_dir, emb_dir = tasks[layout]
    task = load_task(task_dir)
    ours = run_protocol("xares_knn", task_dir, emb_dir)
    theirs = []
    for fold in xares_protocols.xares_folds(task):
        trainer = xares_trainer.KNNTrainer(num_classes=len(task.vocabulary))
        theirs.append(
            trainer.train_and_eval(
                _batches(task, emb_dir, fold.train), _batches(task, emb_dir, fold.test)
            )
        )
    assert ours["metrics"]["accuracy"]["folds"] == pytest.approx(theirs, abs=1e-9)
    assert ours["weight"] == 3 * PER_CLASS_PER_SPLIT


MLP_TOLERANCE = (
    0.15  # accuracy, on 24 test clips a fold: same protocol, different batch order and init
)


@pytest.mark.parametrize("layout", ["folds", "split"])
def test_mlp_close_to_xares_mlp(tasks, layout, tmp_path):
    task_dir, emb_dir = tasks[layout]
    task = load_task(task_dir)
    ours = run_protocol("xares_mlp", task_dir, emb_dir)
    theirs = []
    for fold in xares_protocols.xares_folds(task):
        torch.manual_seed(SEED)
        from xares.models.simple import Mlp

        mlp = Mlp(in_features=192, out_features=len(task.vocabulary))
        ckpt = tmp_path / f"fold{fold.index}"
        trainer = xares_trainer.Trainer(
            mlp,
            device="cpu",
            ckpt_dir=str(ckpt),
            ckpt_name="best.pt",
            lr=1e-3,
            max_epochs=10,
            metric="accuracy",
        )
        trainer.run(
            _batches(task, emb_dir, fold.train, shuffle_seed=SEED),
            _batches(task, emb_dir, fold.valid),
        )
        trainer.load_state_dict(torch.load(ckpt / "best.pt"))
        theirs.append(trainer.run_inference(_batches(task, emb_dir, fold.test)))
    ours_mean, theirs_mean = ours["metrics"]["accuracy"]["mean"], float(np.mean(theirs))
    print(
        f"{layout}: our X-ARES MLP {ours['metrics']['accuracy']['folds']} (mean {ours_mean:.3f}), "
        f"X-ARES's {theirs} (mean {theirs_mean:.3f})"
    )
    assert abs(ours_mean - theirs_mean) <= MLP_TOLERANCE
    assert all(1 <= f["best_epoch"] <= 10 for f in ours["folds"])
