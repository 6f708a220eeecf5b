"""Train a classifier on a Dasheng encoder: :func:`finetune` (``dasheng-pipeline finetune``).

What it does, its options and outputs: ``docs/cli/finetune.md``. The steps, in the order
:func:`finetune` runs them: :mod:`.data` reads DATA and splits it; :mod:`.features` gives the
frozen modes clip embeddings through the shared embedding cache, ``full`` mode log-mels;
:mod:`.train` trains once per fold; :mod:`.report` writes OUT (the classifier through
:mod:`dasheng_pipeline.tools.classifier`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from dasheng_pipeline.common import atomic, audio, provenance
from dasheng_pipeline.tools.classifier import probabilities as scores
from dasheng_pipeline.tools.embed import Model
from dasheng_pipeline.tools.finetune import features, report
from dasheng_pipeline.tools.finetune.data import (
    SPLITS,
    Data,
    Example,
    FinetuneError,
    assign_splits,
    digest,
    read_data,
    split_folds,
    split_once,
    targets,
)
from dasheng_pipeline.tools.finetune.report import Result
from dasheng_pipeline.tools.finetune.train import (
    FineTuner,
    Fit,
    Setup,
    compute_loss,
    full_logits,
    head_logits,
    layer_decay_groups,
    score_metric,
    spec_augment,
    train_frozen,
    train_full,
)

__all__ = [
    "MODES",
    "Data",
    "Example",
    "FineTuner",
    "FinetuneError",
    "Fit",
    "Result",
    "Setup",
    "finetune",
    "layer_decay_groups",
    "read_data",
    "spec_augment",
    "split_folds",
    "split_once",
    "train_frozen",
    "train_full",
]

log = logging.getLogger(__name__)

MODES = ("linear", "mlp", "full")
FROZEN = ("linear", "mlp")
DEFAULTS = {
    "epochs": {"linear": 100, "mlp": 100, "full": 10},
    "lr": {"linear": 1e-3, "mlp": 1e-3, "full": 1e-4},
}


def _check_args(
    mode: str,
    folds: int,
    valid_fraction: float,
    test_fraction: float,
    epochs: int,
    lr: float,
    layer_decay: float,
    mixup: float,
    batch_size: int,
) -> None:
    problems = [
        (mode not in MODES, f"--mode {mode!r}: expected one of {', '.join(MODES)}"),
        (folds == 1 or folds < 0, f"--folds {folds}: expected 0 (one split) or at least 2"),
        (
            not (
                0 <= valid_fraction < 1
                and 0 <= test_fraction < 1
                and valid_fraction + test_fraction < 1
            ),
            f"--valid-fraction {valid_fraction} and --test-fraction {test_fraction}: each in [0, 1), their sum below 1",
        ),
        (epochs < 1, f"--epochs {epochs}: expected at least 1"),
        (not lr > 0, f"--lr {lr}: expected a positive number"),
        (not 0 < layer_decay <= 1, f"--layer-decay {layer_decay}: expected a number in (0, 1]"),
        (mixup < 0, f"--mixup {mixup}: expected 0 (off) or a positive Beta alpha"),
        (batch_size < 1, f"--batch-size {batch_size}: expected at least 1"),
    ]
    for bad, message in problems:
        if bad:
            raise FinetuneError(message)


@dataclass
class _Run:
    """One call's settings, and what its steps hand each other."""

    source: str | os.PathLike  # DATA as given
    out: Path
    data: Data
    enc: Model
    setup: Setup
    folds: int
    valid_fraction: float
    test_fraction: float
    progress: bool


def _load(data, model, out: Path, mode: str, device: str, dtype: str) -> tuple[Data, Model]:
    """DATA read (its bad rows logged) and the encoder loaded."""
    ds = read_data(data)
    for what, reason in ds.rejects:
        log.warning(f"skipped {what}: {reason}")
    out.mkdir(parents=True, exist_ok=True)
    enc = model if isinstance(model, Model) else Model.load(model, device, dtype)
    kind = "multi" if ds.multilabel else "single"
    log.info(
        f"{data}: {len(ds.examples)} files, {len(ds.labels)} classes ({kind}-label); "
        f"model {enc.spec} ({enc.dim}-d, sha256 {enc.sha256[:12]}…); mode {mode}"
    )
    return ds, enc


def _inputs(
    run: _Run, cache_dir
) -> tuple[np.ndarray | list[torch.Tensor], features.CacheUse | None]:
    """What the trainer takes (clip embeddings or log-mels), with ``rejects.csv`` written."""
    ds, s = run.data, run.setup
    if s.mode in FROZEN:
        x, use = features.frozen_features(ds, run.enc, s.batch_size, run.progress, cache_dir)
    else:
        x, use = features.mels(ds, run.enc, run.progress), None
    if not ds.examples:
        raise FinetuneError(
            f"DATA {run.source}: no file could be used; see {run.out / 'rejects.csv'}"
        )
    atomic.write_csv(run.out / "rejects.csv", ["item", "reason"], [list(r) for r in ds.rejects])
    return x, use


def _train_fold(
    run: _Run, x, y: np.ndarray, assign: np.ndarray
) -> tuple[torch.nn.Module, Fit, torch.Tensor]:
    """One training on ``assign == "train"`` → (the net, its fit, the test clips' logits)."""
    s, enc = run.setup, run.enc
    test = assign == "test"
    if s.mode in FROZEN:
        net, fit = train_frozen(x, y, assign, s)
        return net, fit, head_logits(net, torch.from_numpy(x[test]))
    net, fit = train_full(enc, x, y, assign, s, run.progress)
    tuned = Model(enc.spec, net.encoder, enc.sha256, enc.device, enc.dtype)
    mels = [x[i] for i in np.flatnonzero(test)]
    return net, fit, full_logits(net, tuned, mels, s.batch_size)


def _log_fold(k: int, result: dict, fit: Fit) -> None:
    test = "-" if result["test"] is None else round(result["test"]["metric"], 4)
    log.info(f"fold {k}: {result['counts']}; best epoch {fit.best_epoch}; test {test}")
    if fit.best_is_last:
        log.warning(
            f"fold {k}: the best epoch is the last one ({fit.best_epoch} of {len(fit.curve)}): "
            "the validation score was still improving; try more epochs (--epochs)"
        )
    elif not fit.validated:
        log.info(f"fold {k}: no validation examples, the last epoch ({fit.best_epoch}) is kept")


def _train_folds(
    run: _Run, x, y: np.ndarray, assignments: list[np.ndarray]
) -> tuple[list[dict], np.ndarray, tuple[torch.nn.Module, Fit]]:
    """Every fold trained and tested → (per-fold results, pooled test scores, fold 0's net and fit)."""
    multilabel = run.data.multilabel
    pooled = np.full(y.shape, np.nan, np.float32)  # out-of-fold test scores
    fold_results, saved = [], None
    for k, assign in enumerate(assignments):
        counts = {s: int((assign == s).sum()) for s in SPLITS}
        if counts["train"] == 0:
            raise FinetuneError(f"DATA {run.source}: no training examples in this split ({counts})")
        net, fit, logits = _train_fold(run, x, y, assign)
        test = assign == "test"
        result = {"fold": k, "counts": counts, "best_epoch": fit.best_epoch}
        result.update({"epochs_run": len(fit.curve), "test": None})
        if test.any():
            p = scores(logits, multilabel).numpy()
            pooled[test] = p
            result["test"] = {
                "loss": float(compute_loss(logits, torch.from_numpy(y[test]), multilabel)),
                "metric": score_metric(y[test], p, multilabel),
            }
        fold_results.append(result)
        if k == 0:
            saved = (net, fit)  # the classifier written: fold 0's
        _log_fold(k, result, fit)
    if not np.isfinite(pooled).any():
        log.warning(
            "no test split: metrics.json has no test scores (give test rows, or --test-fraction > 0)"
        )
    return fold_results, pooled, saved


def _stamp(run: _Run) -> dict:
    section = {
        "data": {
            "source": str(run.source),
            "examples": len(run.data.examples),
            "sha256": digest(run.data),
        },
        "model": run.enc.spec,
        "model_sha256": run.enc.sha256,
        "mode": run.setup.mode,
        "folds": run.folds,
        "valid_fraction": run.valid_fraction,
        "test_fraction": run.test_fraction,
        "training": asdict(run.setup),
    }
    return provenance.stamp(section, run.setup.seed, audio.versions())


def _result(
    run: _Run, fold_results: list[dict], y: np.ndarray, pooled: np.ndarray, fit: Fit
) -> Result:
    ds = run.data
    tests = [r["test"]["metric"] for r in fold_results if r["test"] is not None]
    test_mean = float(np.nanmean(tests)) if tests and not np.isnan(tests).all() else None
    test_std = float(np.nanstd(tests)) if len(tests) > 1 and test_mean is not None else None
    scored = np.isfinite(pooled).all(axis=1)
    chance = (
        (float(y[scored].mean(0)[y[scored].any(0)].mean()) if scored.any() else float("nan"))
        if ds.multilabel
        else 1.0 / len(ds.labels)
    )
    return Result(
        str(run.out),
        run.setup.mode,
        "mAP" if ds.multilabel else "accuracy",
        test_mean,
        test_std,
        chance,
        len(ds.labels),
        len(ds.examples),
        len(ds.rejects),
        fit.best_epoch,
    )


def _write(run: _Run, res: Result, net, fit: Fit, fold_results, y, pooled, assignments) -> None:
    ds, out = run.data, run.out
    report.write_splits(out, ds, assignments, run.folds)
    stamp = _stamp(run)
    training = {
        "valid_fraction": run.valid_fraction,
        "test_fraction": run.test_fraction,
        "folds": run.folds,
        "best_epoch": fit.best_epoch,
    }
    report.write_classifier(out, net, ds, run.enc, run.setup, training, stamp)
    report.write_metrics(out, res, fold_results, y, pooled, ds.labels, ds.multilabel, stamp)
    report.write_curve(out, fit.curve, res.metric, stamp)


def finetune(
    data: str | Path,
    model: str | Model,
    out: str | Path,
    *,
    mode: str = "mlp",
    folds: int = 0,
    valid_fraction: float = 0.15,
    test_fraction: float = 0.15,
    epochs: int | None = None,
    lr: float | None = None,
    layer_decay: float = 0.75,
    mixup: float = 0.0,
    seed: int = 0,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "fp32",
    progress: bool = True,
    cache_dir: str | Path | None = None,
) -> Result:
    """Train a classifier on DATA with ``model`` and write it with its metrics into ``out``
    (docs/cli/finetune.md). ``cache_dir``: the root of the frozen modes' embedding cache
    (default ``$DASHENG_CACHE_DIR``, else ``$XDG_CACHE_HOME/dasheng-pipeline``)."""
    t0 = time.perf_counter()
    epochs = DEFAULTS["epochs"].get(mode, 1) if epochs is None else epochs
    lr = DEFAULTS["lr"].get(mode, 1e-3) if lr is None else lr
    _check_args(
        mode, folds, valid_fraction, test_fraction, epochs, lr, layer_decay, mixup, batch_size
    )
    out = Path(out)
    ds, enc = _load(data, model, out, mode, device, dtype)
    setup = Setup(mode, ds.multilabel, epochs, lr, layer_decay, mixup, seed, batch_size)
    run = _Run(data, out, ds, enc, setup, folds, valid_fraction, test_fraction, progress)
    x, use = _inputs(run, cache_dir)
    y = targets(ds.examples, ds.labels)
    assignments = assign_splits(ds, folds, valid_fraction, test_fraction, seed, data)
    fold_results, pooled, (net, fit) = _train_folds(run, x, y, assignments)
    res = _result(run, fold_results, y, pooled, fit)
    if use is not None:
        res.embedded, res.cached = use.embedded, use.cached
    _write(run, res, net, fit, fold_results, y, pooled, assignments)
    res.seconds = time.perf_counter() - t0
    log.info(res.line())
    return res
