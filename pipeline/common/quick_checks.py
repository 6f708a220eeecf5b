"""Quick checks: a cosine k-NN and a linear probe on an encoder's clip embeddings of small held-out
task sets, fast enough to run while pre-training runs (as M2D's quick evaluation).

One module for the format and the scores, used by two stages:

- the evaluation stage writes the **quick sets** (``python -m
  dasheng_pipeline.evaluation.tasks.quick_sets``, from a HEAR task's first split) with
  :func:`quick_set_arrays` and :func:`save_quick_set`, and scores every block of every model on
  them for the layer-wise table (``dasheng_pipeline.evaluation.report.layers``, with
  :func:`layer_scores` and :func:`quick_scores`);
- the training stage runs :class:`QuickChecks` every ``training.quick_checks.every_epochs``
  epochs on the current encoder (rows in ``quick_checks.csv`` and TensorBoard), and the report
  draws them with :func:`quick_checks_curve`.

Why here, in ``common``: both stages import it, and the layers (cli → tools → plan → evaluation →
training → features → sources → common → model) let a stage import ``common`` but never the
training stage import the evaluation stage nor (by contract) the reverse. It cannot live in the
model library (``dasheng_model``), which must not import the pipeline: the quick checks write
files atomically (``common.atomic``) and draw figures (matplotlib, ``common.figures``). It needs
numpy, torch, scikit-learn and ``dasheng_model`` (front end, per-block embeddings) only.

**A quick set** (``.npz``, plain arrays, read without pickles): ``name``, ``mel`` (n, 64, T)
float16 dB log-mel from the model's own front end, each clip cut to ``max_seconds`` and padded with
its minimum, ``valid_frames`` (n,) int64, ``label`` (n,) int64 class index, ``train`` (n,) bool (a
train clip, else a test clip), ``classes`` (C,), ``provenance`` (JSON).

**The scores** (:func:`quick_scores`), top-1 accuracy on the test clips:

- **k-NN**: k neighbours (``k``, capped by the train clips), cosine, on clip means;
- **linear**: standardised features, multinomial logistic regression (scikit-learn, lbfgs,
  C = 1, at most 500 iterations).

The check during training appends rows (epoch, step, task, method, layer, score, seconds) to
``quick_checks.csv``, and the last layer's scores to TensorBoard (``quick_checks/<task>/<method>``
and their mean). Nothing here touches a random generator that training uses, and the encoder is
evaluated in eval mode without gradients, so a run with checks trains exactly as one without.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dasheng_model.embed import embed_layers
from dasheng_model.frontend import LogMel
from dasheng_model.inputs import SAMPLES_PER_TOKEN
from dasheng_pipeline.common import atomic, audio

log = logging.getLogger(__name__)

FIELDS = ["epoch", "step", "task", "method", "layer", "score", "seconds"]
METHODS = ("knn", "linear")
CSV_NAME = "quick_checks.csv"
ARRAYS = ("name", "mel", "valid_frames", "label", "train", "classes")


class QuickSetError(ValueError):
    """A quick set that cannot be made or read; the message names the task or the file."""


# ---- the format


@dataclass(frozen=True)
class QuickClip:
    """One clip to put in a quick set: its audio file, class index and side of the split."""

    path: Path
    label: int
    train: bool
    name: str  # "<split>/<file>", for messages


@dataclass
class QuickSet:
    """One task's quick set: clips' log-mel with classes and a train/test split."""

    name: str
    mel: np.ndarray  # (n, 64, T) float16 dB log-mel, padded with each clip's minimum
    valid_frames: np.ndarray  # (n,) int64 real mel frames of each clip
    label: np.ndarray  # (n,) int64 class index
    train: np.ndarray  # (n,) bool: a train clip (else a test clip)
    classes: list[str]


def _clip_mel(logmel: LogMel, clip: QuickClip, task: str, max_samples: int) -> np.ndarray | None:
    """The clip's (64, T) dB log-mel, or None (logged) when it does not decode or holds nothing."""
    try:
        x = audio.decode(clip.path, sample_rate=audio.SAMPLE_RATE)[:max_samples]
    except audio.DecodeError as exc:
        log.warning(f"task {task!r}: skipped {clip.name}: undecodable: {exc.reason}")
        return None
    if x.size == 0 or not np.isfinite(x).all():
        log.warning(f"task {task!r}: skipped {clip.name}: empty or not finite")
        return None
    x = np.pad(x, (0, max(0, SAMPLES_PER_TOKEN - x.size)))
    with torch.no_grad():
        return logmel(torch.from_numpy(x)[None])[0].numpy()


def quick_set_arrays(
    name: str, where: str, clips: list[QuickClip], classes: list[str], max_seconds: float
) -> dict[str, np.ndarray]:
    """The quick set's arrays of ``clips`` (decoded through the project's ffmpeg path, cut to
    ``max_seconds``); clips that do not decode are skipped and logged. ``where`` names the task
    in the error when no train or no test clip is left."""
    from tqdm import tqdm

    logmel = LogMel().eval()
    max_samples = int(max_seconds * audio.SAMPLE_RATE)
    mels, labels, train = [], [], []
    for clip in tqdm(clips, desc=f"quick set {name}", unit="clip", file=sys.stdout, mininterval=5):
        mel = _clip_mel(logmel, clip, name, max_samples)
        if mel is not None:
            mels.append(mel)
            labels.append(clip.label)
            train.append(clip.train)
    if not any(train) or all(train):
        raise QuickSetError(
            f"{where}: the quick set needs train and test clips, "
            f"got {sum(train)} train and {len(train) - sum(train)} test"
        )
    valid = [m.shape[1] for m in mels]
    T = max(valid)
    mel = np.stack(
        [np.pad(m, ((0, 0), (0, T - m.shape[1])), constant_values=m.min()) for m in mels]
    )
    return {
        "name": np.array(name),
        "mel": mel.astype(np.float16),
        "valid_frames": np.array(valid, np.int64),
        "label": np.array(labels, np.int64),
        "train": np.array(train, bool),
        "classes": np.array(classes, dtype=str),
    }


def save_quick_set(path: str | Path, arrays: dict[str, np.ndarray], stamp: dict) -> None:
    """Write a quick set (with its provenance stamp) atomically."""
    arrays = {**arrays, "provenance": np.array(json.dumps(stamp, sort_keys=True))}
    with atomic.atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def load_quick_set(path: str | Path) -> QuickSet:
    """A quick set written by :func:`save_quick_set` (plain arrays, no pickles)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise QuickSetError(
            f"{path}: not a readable quick set ({exc}); delete it and rerun its rule"
        ) from exc
    missing = set(ARRAYS) - set(arrays)
    if missing:
        raise QuickSetError(
            f"{path}: a quick set needs the arrays {sorted(missing)}; delete it and rerun its rule"
        )
    return QuickSet(
        str(arrays["name"]),
        arrays["mel"],
        arrays["valid_frames"].astype(np.int64),
        arrays["label"].astype(np.int64),
        arrays["train"].astype(bool),
        [str(c) for c in arrays["classes"]],
    )


# ---- the scores


@torch.no_grad()
def clip_features(encoder, task: QuickSet, batch_size: int = 64) -> list[np.ndarray]:
    """Clip embeddings of every block, [(n, D)] × depth, from one forward pass per batch."""
    device = next(encoder.parameters()).device
    per_block: list[list[np.ndarray]] = []
    for i in range(0, len(task.mel), batch_size):
        mel = torch.from_numpy(task.mel[i : i + batch_size]).to(device)
        valid = torch.from_numpy(task.valid_frames[i : i + batch_size]).to(device)
        layers = embed_layers(encoder, mel, valid)
        if not per_block:
            per_block = [[] for _ in layers]
        for k, emb in enumerate(layers):
            per_block[k].append(emb.clip.float().cpu().numpy())
    return [np.concatenate(parts) for parts in per_block]


def logmel_features(task: QuickSet) -> np.ndarray:
    """(n, 64): each clip's mean dB log-mel over its real frames (the log-mel baseline)."""
    T = task.mel.shape[2]
    real = np.arange(T)[None, :] < task.valid_frames[:, None]  # (n, T)
    mel = task.mel.astype(np.float32)
    return (mel * real[:, None, :]).sum(2) / task.valid_frames[:, None]


def quick_scores(x: np.ndarray, y: np.ndarray, train: np.ndarray, k: int) -> dict[str, float]:
    """Top-1 accuracy of a cosine k-NN and of a standardised logistic regression, trained on the
    ``train`` rows of clip features ``x`` (n, D) and tested on the others."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    xtr, ytr, xte, yte = x[train], y[train], x[~train], y[~train]
    if len(xtr) == 0 or len(xte) == 0 or len(np.unique(ytr)) < 2:
        raise QuickSetError(
            f"a quick task needs train clips of 2 classes or more and test clips, got "
            f"{len(xtr)} train ({len(np.unique(ytr))} classes) and {len(xte)} test"
        )
    knn = KNeighborsClassifier(
        n_neighbors=min(k, len(xtr)), metric="cosine", algorithm="brute"
    ).fit(xtr, ytr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        linear = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=500)).fit(
            xtr, ytr
        )
    return {
        "knn": float((knn.predict(xte) == yte).mean()),
        "linear": float((linear.predict(xte) == yte).mean()),
    }


def layer_scores(encoder, task: QuickSet, k: int, layers: str) -> list[dict]:
    """Rows {task, method, layer, score}: every block (``layers: all``) or the last one."""
    feats = clip_features(encoder, task)
    picked = range(1, len(feats) + 1) if layers == "all" else [len(feats)]
    rows = []
    for layer in picked:
        for method, score in quick_scores(feats[layer - 1], task.label, task.train, k).items():
            rows.append({"task": task.name, "method": method, "layer": layer, "score": score})
    return rows


# ---- the checks during training


def read_rows(path: str | Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _log_rows(rows: list[dict], epoch: int, step: int, writer) -> None:
    """The last layer's scores to the log and (when given) TensorBoard, with their means."""
    last = max(int(r["layer"]) for r in rows)
    top = [r for r in rows if int(r["layer"]) == last]
    if writer is not None:
        for r in top:
            writer.add_scalar(f"quick_checks/{r['task']}/{r['method']}", float(r["score"]), step)
        for method in METHODS:
            writer.add_scalar(
                f"quick_checks/mean/{method}",
                float(np.mean([float(r["score"]) for r in top if r["method"] == method])),
                step,
            )
    log.info(
        "quick checks after epoch %d: %s",
        epoch,
        ", ".join(f"{r['task']} {r['method']} {float(r['score']):.3f}" for r in top),
    )


class QuickChecks:
    """The training worker's checks (rank 0): ``after_epoch`` every ``every_epochs`` epochs and
    at the last one, on the quick sets ``cfg["quick_sets"]``; rows go to
    ``<state>/quick_checks.csv`` (rows of epochs a resumed run redoes are dropped first, as for
    the metrics). ``cfg``: the training params (``epochs``, ``quick_checks``, ``quick_sets``)."""

    def __init__(self, cfg: dict, state_dir: Path, start_epoch: int):
        checks = cfg["quick_checks"]
        self.every, self.epochs = int(checks["every_epochs"]), int(cfg["epochs"])
        self.k, self.layers = int(checks["k"]), checks["layers"]
        self.csv = Path(state_dir) / CSV_NAME
        self.tasks = [load_quick_set(p) for p in cfg["quick_sets"]] if self.every else []
        kept = (
            [r for r in read_rows(self.csv) if int(r["epoch"]) < start_epoch]
            if self.csv.exists()
            else []
        )
        with atomic.atomic_open(self.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(kept)

    def due(self, epoch: int) -> bool:
        return bool(self.tasks) and ((epoch + 1) % self.every == 0 or epoch + 1 == self.epochs)

    def after_epoch(self, model, epoch: int, step: int, writer=None) -> list[dict]:
        """Score the MAE's (or DDP/compiled wrapper's) encoder; log and append the rows."""
        if not self.due(epoch):
            return []
        inner = getattr(model, "module", model)
        inner = getattr(inner, "_orig_mod", inner)
        encoder = getattr(inner, "encoder", inner)
        rows = []
        for task in self.tasks:
            t0 = time.perf_counter()
            scored = layer_scores(encoder, task, self.k, self.layers)
            seconds = time.perf_counter() - t0
            rows += [
                {"epoch": epoch, "step": step, **r}
                | {"score": f"{r['score']:.6f}", "seconds": f"{seconds:.3f}"}
                for r in scored
            ]
        with open(self.csv, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=FIELDS).writerows(rows)
        _log_rows(rows, epoch, step, writer)
        return rows


# ---- the figure


def _plot_method(ax, rows: list[dict], tasks: Iterable[str], method: str, style: str) -> None:
    """One method's curve per task (thin, coloured) and their mean (thick, black)."""
    by_step: dict[int, list[float]] = {}
    for i, task in enumerate(tasks):
        pts = sorted(
            (int(r["step"]), float(r["score"]) * 100)
            for r in rows
            if r["task"] == task and r["method"] == method
        )
        for s, v in pts:
            by_step.setdefault(s, []).append(v)
        xs, ys = [s for s, _ in pts], [v for _, v in pts]
        ax.plot(xs, ys, style, marker="o", ms=3, color=f"C{i}", alpha=0.7, label=f"{task} {method}")
    steps = sorted(by_step)
    ax.plot(
        steps,
        [np.mean(by_step[s]) for s in steps],
        style,
        color="black",
        lw=2.5,
        label=f"mean {method}",
    )


def quick_checks_curve(csv_path: str | Path, path: str | Path, stamp: dict) -> None:
    """Plot the quick checks' score against the training step: the last layer's k-NN (dashed) and
    linear (solid) accuracy of every task, and their means (thick)."""
    from dasheng_pipeline.common.figures import plt, save_png

    rows = read_rows(csv_path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if not rows:
        text = "no quick checks (training.quick_checks.every_epochs: 0)"
        ax.text(0.5, 0.5, text, ha="center", va="center")
        ax.set_axis_off()
        save_png(fig, path, stamp)
        return
    last = max(int(r["layer"]) for r in rows)
    rows = [r for r in rows if int(r["layer"]) == last]
    tasks = sorted({r["task"] for r in rows})
    for method, style in (("knn", "--"), ("linear", "-")):
        _plot_method(ax, rows, tasks, method, style)
    ax.set_xlabel("training step")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("Quick-check score vs step (k-NN dashed, linear probe solid; last layer)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    save_png(fig, path, stamp)
