"""What a run writes into OUT besides the classifier's weights: metrics.json, per_class.csv,
curve.csv, splits.csv, rejects.csv and the figures (confusion matrix or per-class AP, curves)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from torch import nn

from dasheng_pipeline.common import atomic
from dasheng_pipeline.tools.classifier import Head, encoder_meta, head_config
from dasheng_pipeline.tools.classifier import save as save_classifier
from dasheng_pipeline.tools.embed import Model
from dasheng_pipeline.tools.finetune.data import Data
from dasheng_pipeline.tools.finetune.train import (
    CROP_FRAMES,
    FREQ_MASK_BINS,
    HEAD_BATCH,
    PATIENCE,
    TIME_MASK_FRACTION,
    WEIGHT_DECAY,
    Setup,
)


@dataclass
class Result:
    out: str
    mode: str
    metric: str  # accuracy or mAP
    test: float | None  # on the test split (mean over folds with --folds)
    test_std: float | None  # over folds
    chance: float
    classes: int
    examples: int
    rejected: int
    best_epoch: int
    seconds: float = 0.0
    embedded: int = 0  # frozen modes: files this run embedded
    cached: int = 0  # frozen modes: files the embedding cache answered

    def line(self) -> str:
        score = (
            "no test split"
            if self.test is None
            else (
                f"test {self.metric} {self.test:.3f}"
                + (f" ± {self.test_std:.3f}" if self.test_std is not None else "")
            )
        )
        return (
            f"{self.out}: {self.mode} on {self.examples} clips, {self.classes} classes: {score} "
            f"(chance {self.chance:.3f}); best epoch {self.best_epoch}; {self.rejected} rejected; "
            f"{self.seconds:.1f} s"
            + (
                f"; embeddings: {self.embedded} new, {self.cached} cached"
                if self.mode != "full"
                else ""
            )
        )


def _fmt(v) -> str | int:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.6g}" if isinstance(v, float) else v


def _num(v: float | None) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def write_classifier(
    out: Path, net: nn.Module, data: Data, enc: Model, s: Setup, training: dict, stamp: dict
) -> None:
    """classifier.safetensors and classifier.json; ``training``: what the run adds to ``s``
    (split settings, best epoch)."""
    mode, labels = s.mode, data.labels
    head = net if isinstance(net, Head) else net.head
    training = {**asdict(s), **training}
    if mode == "full":
        training.update(
            {
                "weight_decay": WEIGHT_DECAY,
                "crop_frames": CROP_FRAMES,
                "freq_mask_bins": FREQ_MASK_BINS,
                "time_mask_fraction": TIME_MASK_FRACTION,
                "optimizer": "AdamW",
                "schedule": "warmup 1 epoch, cosine",
            }
        )
    else:
        training.update({"batch": HEAD_BATCH, "patience": PATIENCE, "optimizer": "Adam"})
    meta = {
        "labels": labels,
        "multilabel": data.multilabel,
        "mode": mode,
        "model": encoder_meta(enc),
        "head": head_config(mode, head.mean.numel(), len(labels)),
        "training": training,
        "provenance": stamp,
    }
    save_classifier(out, head, net.encoder if mode == "full" else None, meta)


def _per_class(
    y: np.ndarray, pooled: np.ndarray, labels: list[str], multilabel: bool
) -> tuple[list[list], dict]:
    """Rows of per_class.csv from the scored examples' predictions, and what the plot needs."""
    from sklearn.metrics import (
        average_precision_score,
        confusion_matrix,
        precision_recall_fscore_support,
    )

    scored = np.isfinite(pooled).all(axis=1)
    ys, ps = y[scored], pooled[scored]
    examples = y.sum(0).astype(int)
    if multilabel:
        ap = [
            float(average_precision_score(ys[:, c], ps[:, c]))
            if 0 < ys[:, c].sum() < len(ys)
            else float("nan")
            for c in range(len(labels))
        ]
        rows = [
            [lab, int(examples[c]), int(ys[:, c].sum()), _fmt(ap[c])]
            for c, lab in enumerate(labels)
        ]
        return rows, {"ap": ap}
    true, pred = ys.argmax(1), ps.argmax(1)
    prec, rec, f1, support = precision_recall_fscore_support(
        true, pred, labels=range(len(labels)), zero_division=0
    )
    rows = [
        [lab, int(examples[c]), int(support[c])]
        + (
            [_fmt(float(prec[c])), _fmt(float(rec[c])), _fmt(float(f1[c]))]
            if support[c]
            else ["", "", ""]
        )
        for c, lab in enumerate(labels)
    ]
    return rows, {"confusion": confusion_matrix(true, pred, labels=range(len(labels)))}


def _metrics_json(res: Result, folds: list[dict], pooled: np.ndarray, multilabel: bool) -> dict:
    def test(t: dict | None) -> dict | None:
        return None if t is None else {k: _num(v) for k, v in t.items()}

    return {
        "metric": res.metric,
        "multilabel": multilabel,
        "mode": res.mode,
        "classes": res.classes,
        "examples": res.examples,
        "rejected": res.rejected,
        "chance": _num(res.chance),
        "test": {
            "mean": _num(res.test),
            "std": _num(res.test_std),
            "folds": [None if f["test"] is None else _num(f["test"]["metric"]) for f in folds],
        },
        "scored_examples": int(np.isfinite(pooled).all(axis=1).sum()),
        "folds": [{**f, "test": test(f["test"])} for f in folds],
    }


def _plot_ap(out: Path, ap: list[float], labels: list[str], res: Result, stamp: dict) -> None:
    from dasheng_pipeline.common.figures import plt, save_png

    n = len(labels)
    fig, ax = plt.subplots(figsize=(6, 1.5 + 0.25 * n))
    ax.barh(range(n), [0 if math.isnan(a) else a for a in ap], color="tab:blue")
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("average precision (test)")
    ax.set_title(f"Per-class AP, mAP {res.test:.3f}" if res.test is not None else "Per-class AP")
    save_png(fig, out / "per_class_ap.png", stamp)


def _plot_confusion(
    out: Path, cm: np.ndarray, labels: list[str], res: Result, pooled_folds: bool, stamp: dict
) -> None:
    from dasheng_pipeline.common.figures import plt, save_png

    n = len(labels)
    size = 2.5 + 0.22 * n
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        for i, j in zip(*np.nonzero(cm)):
            color = "white" if cm[i, j] > cm.max() / 2 else "black"
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    title = "Confusion matrix (test" + (", out-of-fold" if pooled_folds else "") + ")"
    ax.set_title(title + (f", accuracy {res.test:.3f}" if res.test is not None else ""))
    save_png(fig, out / "confusion.png", stamp)


def write_metrics(
    out: Path,
    res: Result,
    folds: list[dict],
    y: np.ndarray,
    pooled: np.ndarray,
    labels: list[str],
    multilabel: bool,
    stamp: dict,
) -> None:
    """per_class.csv, metrics.json and the per-class figure, from the pooled test scores."""
    rows, plot = _per_class(y, pooled, labels, multilabel)
    header = (
        ["label", "examples", "scored_positives", "ap"]
        if multilabel
        else ["label", "examples", "scored", "precision", "recall", "f1"]
    )
    atomic.write_csv(out / "per_class.csv", header, rows)
    metrics = _metrics_json(res, folds, pooled, multilabel)
    atomic.write_json(out / "metrics.json", {**metrics, "provenance": stamp})
    if multilabel:
        _plot_ap(out, plot["ap"], labels, res, stamp)
    else:
        _plot_confusion(out, plot["confusion"], labels, res, len(folds) > 1, stamp)


def write_splits(out: Path, data: Data, assignments: list[np.ndarray], folds: int) -> None:
    """splits.csv: each example's path, labels and split (fold 0's), with folds its test fold."""
    test_fold = (
        {i: k for k, a in enumerate(assignments) for i in np.flatnonzero(a == "test")}
        if folds
        else None
    )
    atomic.write_csv(
        out / "splits.csv",
        ["path", "label", "split"] + (["test_fold"] if test_fold is not None else []),
        [
            [e.item.path, ";".join(e.labels), assignments[0][i]]
            + ([test_fold.get(i, "")] if test_fold is not None else [])
            for i, e in enumerate(data.examples)
        ],
    )


def write_curve(out: Path, curve: list[dict], metric: str, stamp: dict) -> None:
    from dasheng_pipeline.common.figures import plt, save_png

    atomic.write_csv(
        out / "curve.csv",
        ["epoch", "train_loss", "valid_loss", f"valid_{metric}"],
        [
            [r["epoch"], _fmt(r["train_loss"]), _fmt(r["valid_loss"]), _fmt(r["valid_metric"])]
            for r in curve
        ],
    )
    epochs = [r["epoch"] for r in curve]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(epochs, [r["train_loss"] for r in curve], "-", label="train loss")
    if any(r["valid_loss"] is not None for r in curve):
        a.plot(epochs, [r["valid_loss"] for r in curve], "-", label="valid loss")
        b.plot(epochs, [r["valid_metric"] for r in curve], "-", color="tab:green")
    b.set_ylabel(f"valid {metric}")
    for ax in (a, b):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    a.legend()
    a.set_title("Loss")
    b.set_title(
        f"Validation {metric}"
        if any(r["valid_metric"] is not None for r in curve)
        else "No validation split"
    )
    fig.tight_layout()
    save_png(fig, out / "curve.png", stamp)
