"""HEAR's MLP probe on frozen embeddings: ``python -m dasheng_pipeline.evaluation.protocols.hear_mlp``.

The protocol (``shared/design/hear-facts.md``):

- MLP: 1 or 2 hidden layers of 1024 units, each Linear → BatchNorm1d → Dropout(0.1) → ReLU, then
  an output Linear; weights initialised with the grid point's ``xavier_uniform`` or
  ``xavier_normal``.
- Grid: hidden layers {1, 2} × lr {3.2e-3, 1e-3, 3.2e-4, 1e-4} × init {xavier_uniform,
  xavier_normal} = 16 points, of which 8 are sampled with the seed. Adam, batch 1024, at most 500
  epochs, validation every 3 epochs, early stopping after 20 validations without improvement of
  the task's primary metric; the weights of the best validation are kept.
- Loss: cross-entropy (multiclass), binary cross-entropy (multilabel and event tasks).
- Splits: the grid is searched on the first split (train / valid / test, or fold 0 of a k-fold
  task: test fold 0, valid fold 1, train the rest); the best point is then retrained on every
  split (the first split's search model is reused: same seed, same data, same result) and the
  test scores are averaged over splits.
- Event tasks: frame-level (25 Hz) predictions; a frame is positive for a label when its
  timestamp lies in [start, end] of an event of that label. Post-processing: threshold 0.5, median
  filter of 250 ms (the odd number of frames nearest above), events shorter than the minimum
  duration dropped, the minimum chosen from {125, 250} ms on the validation split.

Everything runs on the CPU in float32 with ``torch.manual_seed``: the same seed gives the same scores.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dasheng_pipeline.common import atomic, logs, provenance, sections
from dasheng_pipeline.evaluation import metrics
from dasheng_pipeline.evaluation.embeddings import load_meta
from dasheng_pipeline.evaluation.protocols import inputs
from dasheng_pipeline.evaluation.protocols.inputs import SplitData
from dasheng_pipeline.evaluation.tasks import hear

log = logging.getLogger(__name__)

HEAR_GRID = {
    "hidden_layers": [1, 2],
    "lr": [3.2e-3, 1e-3, 3.2e-4, 1e-4],
    "init": ["xavier_uniform", "xavier_normal"],
}


@dataclass
class ProbeConfig:
    hidden_layers: list[int] = field(default_factory=lambda: list(HEAR_GRID["hidden_layers"]))
    lr: list[float] = field(default_factory=lambda: list(HEAR_GRID["lr"]))
    init: list[str] = field(default_factory=lambda: list(HEAR_GRID["init"]))
    grid_points: int = 8
    hidden_dim: int = 1024
    dropout: float = 0.1
    batch_size: int = 1024
    max_epochs: int = 500
    check_every: int = 3
    patience: int = 20
    threshold: float = 0.5
    median_filter_ms: float = 250.0
    min_duration_ms: list[float] = field(default_factory=lambda: [125.0, 250.0])
    check_every_by_task: dict[str, int] = field(default_factory=lambda: {"dcase2016_task2": 10})
    # None = HEAR (batch_size items per step); N = the batch shrinks to ceil(train items / N) so that
    # an epoch of a small task is N optimiser steps, not one (see DEMO_PROTOCOL in the module doc).
    steps_per_epoch: int | None = None

    @classmethod
    def from_dict(cls, d: dict | None) -> ProbeConfig:
        return sections.from_section(cls, d, "evaluation.probe")


def protocol(cfg: ProbeConfig) -> str:
    """Which protocol ``cfg`` is: ``HEAR``, or ``HEAR except`` the keys it changes (HEAR's value)."""
    hear_cfg = asdict(ProbeConfig())
    changed = [f"{k} {v} (HEAR {hear_cfg[k]})" for k, v in asdict(cfg).items() if v != hear_cfg[k]]
    return "HEAR" if not changed else "HEAR except " + ", ".join(changed)


def batch_size_for(cfg: ProbeConfig, n: int) -> int:
    """Items per optimiser step for ``n`` training items."""
    if not cfg.steps_per_epoch:
        return cfg.batch_size
    return min(cfg.batch_size, max(2, math.ceil(n / cfg.steps_per_epoch)))


@dataclass(frozen=True)
class HParams:
    hidden_layers: int
    lr: float
    init: str


def grid(cfg: ProbeConfig, seed: int) -> list[HParams]:
    """The grid points to search: ``grid_points`` of the full product, sampled with ``seed``
    (all of them when the product is no larger)."""
    full = [
        HParams(h, float(lr), i)
        for h, lr, i in itertools.product(cfg.hidden_layers, cfg.lr, cfg.init)
    ]
    if len(full) <= cfg.grid_points:
        return full
    return random.Random(seed).sample(full, cfg.grid_points)


def build_mlp(
    in_dim: int, out_dim: int, hp: HParams, hidden_dim: int = 1024, dropout: float = 0.1
) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(hp.hidden_layers):
        layers += [
            nn.Linear(d, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.Dropout(dropout),
            nn.ReLU(),
        ]
        d = hidden_dim
    layers.append(nn.Linear(d, out_dim))
    init = {"xavier_uniform": nn.init.xavier_uniform_, "xavier_normal": nn.init.xavier_normal_}.get(
        hp.init
    )
    if init is None:
        raise ValueError(
            f"evaluation.probe.init: unknown initialisation {hp.init!r}; expected xavier_uniform or xavier_normal"
        )
    for layer in layers:
        if isinstance(layer, nn.Linear):
            init(layer.weight)
    return nn.Sequential(*layers)


# -- data ----------------------------------------------------------------------------------------------


def frame_targets(events, timestamps: np.ndarray, hop_ms: float, index: dict[str, int], C: int):
    """HEAR's frame labels: a frame is on for an event's label when its timestamp lies in
    [start, end] (``hop_ms`` is not needed)."""
    y = np.zeros((len(timestamps), C), np.float32)
    for ev in events:
        y[(timestamps >= ev.start_ms) & (timestamps <= ev.end_ms), index[ev.label]] = 1.0
    return y


def load_splits(task: hear.Task, emb_dir: Path, splits: tuple[str, ...]) -> SplitData:
    """The probe's inputs of ``splits``: clip or frame embeddings, HEAR's targets."""
    return inputs.load_splits(task, emb_dir, splits, frame_targets)


# -- event post-processing -----------------------------------------------------------------------------


def frames_to_events(
    probs: np.ndarray,
    timestamps: np.ndarray,
    labels: list[str],
    file: str,
    threshold: float,
    median_frames: int,
    min_duration_ms: float,
) -> list[dict]:
    """(T, C) probabilities of one file → events: threshold, median filter, runs → events
    (onset/offset half a hop before/after the first/last frame's centre), short ones dropped."""
    from scipy.ndimage import median_filter

    if probs.shape[0] == 0:
        return []
    hop = float(np.median(np.diff(timestamps))) if len(timestamps) > 1 else 40.0
    active = (probs > threshold).astype(np.uint8)
    if median_frames > 1:
        active = median_filter(active, size=(median_frames, 1), mode="nearest")
    out = []
    for c, label in enumerate(labels):
        col = np.concatenate([[0], active[:, c], [0]])
        edges = np.flatnonzero(np.diff(col))
        for start, end in zip(edges[::2], edges[1::2]):  # frames [start, end)
            onset = max(0.0, float(timestamps[start]) - hop / 2)
            offset = float(timestamps[end - 1]) + hop / 2
            if offset - onset >= min_duration_ms:
                out.append(
                    {"file": file, "label": label, "onset": onset / 1000, "offset": offset / 1000}
                )
    return out


def median_frames(median_ms: float, hop_ms: float) -> int:
    n = max(1, int(round(median_ms / hop_ms)))
    return n if n % 2 else n + 1


# -- training --------------------------------------------------------------------------------------


class Scorer:
    """Scores predictions of a split with the task's metrics (and picks event post-processing)."""

    def __init__(self, task: hear.Task, cfg: ProbeConfig):
        self.task, self.cfg = task, cfg
        self.multiclass = task.prediction_type == "multiclass"

    def probabilities(self, logits: torch.Tensor) -> np.ndarray:
        return (torch.softmax(logits, -1) if self.multiclass else torch.sigmoid(logits)).numpy()

    def events(self, probs: np.ndarray, data: SplitData, min_duration_ms: float) -> list[dict]:
        out = []
        hop = (
            float(np.median(np.diff(data.timestamps[: min(len(data.timestamps), 50)])))
            if len(data.timestamps) > 1
            else 40.0
        )
        mf = median_frames(self.cfg.median_filter_ms, hop)
        for i, file in enumerate(data.files):
            a, b = int(data.offsets[i]), int(data.offsets[i + 1])
            out += frames_to_events(
                probs[a:b],
                data.timestamps[a:b],
                self.task.vocabulary,
                file,
                self.cfg.threshold,
                mf,
                min_duration_ms,
            )
        return out

    def score(
        self, metric: str, probs: np.ndarray, data: SplitData, min_duration_ms: float | None = None
    ) -> float:
        if self.task.is_event:
            est = self.events(
                probs,
                data,
                min_duration_ms if min_duration_ms is not None else self.cfg.min_duration_ms[0],
            )
            return metrics.event_score(metric, data.events, est, self.task.vocabulary, data.files)
        return metrics.scene_score(metric, data.y, probs, self.task.vocabulary)

    def validate(self, probs: np.ndarray, data: SplitData) -> tuple[float, float | None]:
        """Primary metric on validation; for event tasks the best over the minimum durations."""
        metric = self.task.primary_metric
        if not self.task.is_event:
            return self.score(metric, probs, data), None
        best, best_d = None, None
        for d in self.cfg.min_duration_ms:
            s = self.score(metric, probs, data, d)
            if metrics.is_better(metric, s, best):
                best, best_d = s, d
        return (best if best is not None else float("nan")), best_d


@dataclass
class Trained:
    model: nn.Module
    hp: HParams
    val_score: float
    min_duration_ms: float | None
    epochs: int
    best_epoch: int


def predict(model: nn.Module, x: torch.Tensor, batch: int = 8192) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return (
            torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])
            if len(x)
            else torch.zeros(0)
        )


def train(
    train_data: SplitData,
    valid_data: SplitData,
    hp: HParams,
    cfg: ProbeConfig,
    scorer: Scorer,
    seed: int,
    check_every: int,
) -> Trained:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(train_data.x)
    y = torch.from_numpy(train_data.y)
    xv = torch.from_numpy(valid_data.x)
    multiclass = scorer.multiclass
    target = y.argmax(1) if multiclass else y
    model = build_mlp(x.shape[1], y.shape[1], hp, cfg.hidden_dim, cfg.dropout)
    opt = torch.optim.Adam(model.parameters(), lr=hp.lr)
    loss_fn = nn.CrossEntropyLoss() if multiclass else nn.BCEWithLogitsLoss()
    metric = scorer.task.primary_metric
    best, best_state, best_d, best_epoch, bad = None, None, None, 0, 0
    n = len(x)
    batch = batch_size_for(cfg, n)
    epoch = 0
    for epoch in range(1, cfg.max_epochs + 1):
        model.train()
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, batch):
            idx = order[i : i + batch]
            if (
                len(idx) < 2
            ):  # BatchNorm needs two items; a lone leftover item waits for the next epoch
                continue
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), target[idx])
            loss.backward()
            opt.step()
        if epoch % check_every == 0 or epoch == cfg.max_epochs:
            probs = scorer.probabilities(predict(model, xv))
            score, d = scorer.validate(probs, valid_data)
            if metrics.is_better(metric, score, best):
                best, best_d, best_epoch, bad = score, d, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad += 1
                if bad >= cfg.patience:
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return Trained(
        model, hp, float("nan") if best is None else float(best), best_d, epoch, best_epoch
    )


def _mean_std(values: list[float]) -> dict:
    arr = np.array(values, dtype=np.float64)
    ok = arr[~np.isnan(arr)]
    return {
        "mean": float(ok.mean()) if ok.size else None,
        "std": float(ok.std()) if ok.size else None,
        "folds": [None if math.isnan(v) else float(v) for v in arr],
    }


def _search(
    task: hear.Task, emb_dir: Path, cfg: ProbeConfig, scorer: Scorer, seed: int, check_every: int
) -> tuple[Trained, list[dict], int]:
    """The grid search on the first split: the best point's model, every point's record and the
    number of training items."""
    from tqdm import tqdm

    first = task.folds()[0]
    tr, va = load_splits(task, emb_dir, first.train), load_splits(task, emb_dir, first.valid)
    search = []
    best: Trained | None = None
    desc = f"probe {load_meta(emb_dir)['model']}/{task.name} grid"
    for hp in tqdm(grid(cfg, seed), desc=desc, unit="point", file=sys.stdout):
        result = train(tr, va, hp, cfg, scorer, seed, check_every)
        search.append(
            {
                **asdict(hp),
                "val_score": result.val_score,
                "epochs": result.epochs,
                "best_epoch": result.best_epoch,
                "min_duration_ms": result.min_duration_ms,
            }
        )
        log.info(
            f"  {hp}: validation {task.primary_metric} = {result.val_score:.4f} "
            f"(best epoch {result.best_epoch} of {result.epochs})"
        )
        if best is None or metrics.is_better(task.primary_metric, result.val_score, best.val_score):
            best = result
    assert best is not None
    log.info(f"best grid point: {best.hp} (validation {task.primary_metric} {best.val_score:.4f})")
    return best, search, len(tr.x)


def _test_split(
    task: hear.Task, emb_dir: Path, fold: hear.Fold, trained: Trained, n_train: int, scorer: Scorer
) -> dict:
    """The record of one split: its test scores with the model trained on it."""
    te = load_splits(task, emb_dir, fold.test)
    probs = scorer.probabilities(predict(trained.model, torch.from_numpy(te.x)))
    scores = {m: scorer.score(m, probs, te, trained.min_duration_ms) for m in task.evaluation}
    log.info(
        f"  split {fold.index} (test {', '.join(fold.test)}): "
        + ", ".join(f"{m} {v:.4f}" for m, v in scores.items())
    )
    return {
        "index": fold.index,
        "train": list(fold.train),
        "valid": list(fold.valid),
        "test": list(fold.test),
        "n_train": int(n_train),
        "n_test": int(len(te.x)),
        "val_score": trained.val_score,
        "epochs": trained.epochs,
        "best_epoch": trained.best_epoch,
        "min_duration_ms": trained.min_duration_ms,
        "scores": scores,
    }


def run(
    task_dir: str | Path,
    emb_dir: str | Path,
    cfg: ProbeConfig,
    seed: int,
    threads: int,
    stamp_section: dict,
) -> dict:
    """HEAR's probe on one task's embeddings: the grid searched on the first split, the best
    point retrained on every split; returns the result (``stamp_section``: what the provenance
    stamp hashes, the job's params)."""
    from tqdm import tqdm

    torch.set_num_threads(max(1, threads))
    task = hear.load_task(task_dir)
    emb_dir = Path(emb_dir)
    meta = load_meta(emb_dir)
    scorer = Scorer(task, cfg)
    check_every = int(cfg.check_every_by_task.get(task.name, cfg.check_every))
    t0 = time.perf_counter()
    best, search, n_first = _search(task, emb_dir, cfg, scorer, seed, check_every)
    fold_results = []
    desc = f"probe {meta['model']}/{task.name} splits"
    for fold in tqdm(task.folds(), desc=desc, unit="split", file=sys.stdout):
        trained, n_train = best, n_first
        if fold.index != 0:
            tr, va = load_splits(task, emb_dir, fold.train), load_splits(task, emb_dir, fold.valid)
            trained, n_train = train(tr, va, best.hp, cfg, scorer, seed, check_every), len(tr.x)
        fold_results.append(_test_split(task, emb_dir, fold, trained, n_train, scorer))
    summary = {m: _mean_std([f["scores"][m] for f in fold_results]) for m in task.evaluation}
    log.info(
        f"probe done in {time.perf_counter() - t0:.1f} s: "
        + ", ".join(
            f"{m} {v['mean']:.4f} ± {v['std']:.4f}"
            for m, v in summary.items()
            if v["mean"] is not None
        )
    )
    return {
        **inputs.result_fields("probe", meta, task, task_dir),
        "primary_metric": task.primary_metric,
        "metrics": summary,
        "best_hparams": asdict(best.hp),
        "grid": search,
        "folds": fold_results,
        "config": asdict(cfg),
        "protocol": protocol(cfg),
        "seed": seed,
        "embeddings_provenance": meta.get("provenance"),
        "provenance": provenance.stamp(stamp_section, seed),
    }


def main(argv: list[str] | None = None) -> None:
    parser = inputs.scoring_parser(
        "dasheng_pipeline.evaluation.protocols.hear_mlp", __doc__, "seed, probe (ProbeConfig keys)"
    )
    args = parser.parse_args(argv)
    logs.setup()
    params = json.loads(args.params)
    with logs.one_line_errors():
        seed, cfg = int(params["seed"]), ProbeConfig.from_dict(params["probe"])
        result = run(args.task, args.embeddings, cfg, seed, args.threads, params)
    atomic.write_json(args.out, result)


if __name__ == "__main__":
    main()
