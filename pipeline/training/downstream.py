"""Downstream checks while pre-training runs (as M2D's quick evaluation): every
``training.downstream.every_epochs`` epochs, rank 0 embeds a small held-out task set with the
current encoder and scores a k-NN and a fast linear probe on it, per block.

The task set is one or more *quick sets*, ``.npz`` files the evaluation stage writes from HEAR task
folders (``python -m dasheng_pipeline.evaluation.quickset``): every clip's dB log-mel, cut to
``max_seconds``, with its class and whether it is a train or a test clip (the task's first split:
train + valid → train, test → test). This module only reads them (numpy), so the training stage
never imports the evaluation stage.

The scores (``quick_scores``) are those of ``dasheng_pipeline.evaluation.layers``'s layer-wise table too:

- **k-NN**: k = 10 (capped by the train clips), cosine, top-1 accuracy on clip means;
- **linear**: standardised features, multinomial logistic regression (scikit-learn, lbfgs,
  C = 1, at most 500 iterations), top-1 accuracy on the test clips.

Each check appends rows (epoch, step, task, method, layer, score, seconds) to ``downstream.csv``
and the last layer's scores to TensorBoard (``downstream/<task>/<method>`` and their mean); the
figure ``downstream score vs step`` is :func:`downstream_curve`. Nothing here touches a random
generator that training uses, and the encoder is evaluated in eval mode without gradients, so a
run with checks trains exactly as one without.
"""

from __future__ import annotations

import csv
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dasheng_model.embed import embed_layers
from dasheng_pipeline.common import atomic

log = logging.getLogger(__name__)

FIELDS = ["epoch", "step", "task", "method", "layer", "score", "seconds"]
METHODS = ("knn", "linear")


@dataclass
class QuickTask:
    """One task of the quick set: clips' log-mel with classes and a train/test split."""

    name: str
    mel: np.ndarray  # (n, 64, T) float16 dB log-mel, padded with each clip's minimum
    valid_frames: np.ndarray  # (n,) int64 real mel frames of each clip
    label: np.ndarray  # (n,) int64 class index
    train: np.ndarray  # (n,) bool: a train clip (else a test clip)
    classes: list[str]


def load_quick_task(path: str | Path) -> QuickTask:
    """A quick set written by ``dasheng_pipeline.evaluation.quickset`` (plain arrays, no pickles)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"{path}: not a readable quick set ({exc}); delete it and rerun its rule"
        ) from exc
    missing = {"name", "mel", "valid_frames", "label", "train", "classes"} - set(arrays)
    if missing:
        raise ValueError(
            f"{path}: a quick set needs the arrays {sorted(missing)}; delete it and rerun its rule"
        )
    return QuickTask(
        str(arrays["name"]),
        arrays["mel"],
        arrays["valid_frames"].astype(np.int64),
        arrays["label"].astype(np.int64),
        arrays["train"].astype(bool),
        [str(c) for c in arrays["classes"]],
    )


@torch.no_grad()
def clip_features(encoder, task: QuickTask, batch_size: int = 64) -> list[np.ndarray]:
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


def quick_scores(x: np.ndarray, y: np.ndarray, train: np.ndarray, k: int = 10) -> dict[str, float]:
    """Top-1 accuracy of a cosine k-NN and of a standardised logistic regression, trained on the
    ``train`` rows of clip features ``x`` (n, D) and tested on the others."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    xtr, ytr, xte, yte = x[train], y[train], x[~train], y[~train]
    if len(xtr) == 0 or len(xte) == 0 or len(np.unique(ytr)) < 2:
        raise ValueError(
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


def layer_scores(encoder, task: QuickTask, k: int = 10, layers: str = "all") -> list[dict]:
    """Rows {task, method, layer, score}: every block (``layers: all``) or the last one."""
    feats = clip_features(encoder, task)
    picked = range(1, len(feats) + 1) if layers == "all" else [len(feats)]
    rows = []
    for layer in picked:
        for method, score in quick_scores(feats[layer - 1], task.label, task.train, k).items():
            rows.append({"task": task.name, "method": method, "layer": layer, "score": score})
    return rows


def read_rows(path: str | Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


class DownstreamCheck:
    """The training worker's check (rank 0): ``after_epoch`` every ``every_epochs`` epochs and at
    the last one; rows go to ``<state>/downstream.csv`` (rows of epochs a resumed run redoes are
    dropped first, as for the metrics)."""

    def __init__(self, cfg: dict, state_dir: Path, start_epoch: int):
        d = cfg.get("downstream") or {}
        self.every, self.epochs = int(d.get("every_epochs", 0)), int(cfg["epochs"])
        self.k, self.layers = int(d.get("k", 10)), d.get("layers", "all")
        self.csv = Path(state_dir) / "downstream.csv"
        self.tasks = (
            [load_quick_task(p) for p in cfg.get("downstream_sets") or []] if self.every else []
        )
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
                {
                    "epoch": epoch,
                    "step": step,
                    **r,
                    "score": f"{r['score']:.6f}",
                    "seconds": f"{seconds:.3f}",
                }
                for r in scored
            ]
        with open(self.csv, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=FIELDS).writerows(rows)
        last = max(int(r["layer"]) for r in rows)
        top = [r for r in rows if int(r["layer"]) == last]
        if writer is not None:
            for r in top:
                writer.add_scalar(f"downstream/{r['task']}/{r['method']}", float(r["score"]), step)
            for method in METHODS:
                writer.add_scalar(
                    f"downstream/mean/{method}",
                    float(np.mean([float(r["score"]) for r in top if r["method"] == method])),
                    step,
                )
        log.info(
            "downstream after epoch %d: %s",
            epoch,
            ", ".join(f"{r['task']} {r['method']} {float(r['score']):.3f}" for r in top),
        )
        return rows


def downstream_curve(csv_path: str | Path, path: str | Path, stamp: dict) -> None:
    """Plot "downstream score vs step": last layer's k-NN (dashed) and linear (solid) accuracy of
    every task, and their means (thick)."""
    from dasheng_pipeline.common.figures import plt, save_png

    rows = read_rows(csv_path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if not rows:
        ax.text(
            0.5,
            0.5,
            "no downstream checks (training.downstream.every_epochs: 0)",
            ha="center",
            va="center",
        )
        ax.set_axis_off()
        save_png(fig, path, stamp)
        return
    last = max(int(r["layer"]) for r in rows)
    rows = [r for r in rows if int(r["layer"]) == last]
    tasks = sorted({r["task"] for r in rows})
    styles = {"knn": "--", "linear": "-"}
    for method in METHODS:
        by_step: dict[int, list[float]] = {}
        for i, task in enumerate(tasks):
            pts = sorted(
                (int(r["step"]), float(r["score"]) * 100)
                for r in rows
                if r["task"] == task and r["method"] == method
            )
            for s, v in pts:
                by_step.setdefault(s, []).append(v)
            ax.plot(
                [s for s, _ in pts],
                [v for _, v in pts],
                styles[method],
                marker="o",
                ms=3,
                color=f"C{i}",
                alpha=0.7,
                label=f"{task} {method}",
            )
        steps = sorted(by_step)
        ax.plot(
            steps,
            [np.mean(by_step[s]) for s in steps],
            styles[method],
            color="black",
            lw=2.5,
            label=f"mean {method}",
        )
    ax.set_xlabel("training step")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("Downstream score vs step (k-NN dashed, linear probe solid; last layer)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    save_png(fig, path, stamp)
