"""X-ARES's two protocols on frozen embeddings: ``python -m dasheng_pipeline.evaluation.protocols.xares``.

Read from X-ARES 0.1.3's own code (``xares/task.py``, ``xares/trainer.py``, ``xares/models/simple.py``),
and checked against it in ``tests/evaluation/test_xares.py``:

- **MLP** (``xares_mlp``): LayerNorm(D) + Linear(D, C) (torch's default init after
  ``torch.manual_seed(seed)``) on the clip embedding, the mean of the real frames (padding
  excluded); frame tasks apply it to every real frame. Adam, lr 1e-3, cosine decay per epoch from lr
  to 0.1 × lr (ignite's ``CosineAnnealingScheduler`` over ``epochs``: epoch e runs at
  lr − 0.45·lr·(1 − cos(π(e−1)/epochs))), 10 epochs, batch 32 (last batch kept), shuffled each epoch
  from the seed; validation after every epoch, the weights of the first best epoch kept
  (ignite's ``ModelCheckpoint``, n_saved 1), then scored on test. Cross-entropy (multiclass) or
  binary cross-entropy (multilabel, frame).
- **k-NN** (``xares_knn``): k = 10, the references are the train split only (k-fold: the other
  folds), similarity = query (unit norm) · reference matrix, votes weighted by
  softmax(similarity / 0.07) over the k nearest, the class with the largest summed weight wins.
  X-ARES normalises the (D, N) reference matrix along its sample axis (each embedding dimension to
  unit norm over the references), not each reference to unit norm; we do the same so that the
  scores are X-ARES's (the ranking is therefore cosine only up to that per-dimension scaling).
  Multiclass tasks only (X-ARES runs no k-NN on its multilabel and frame tasks).
- **Splits**: train / valid / test as named; a k-fold task trains on all folds but one and
  **validates and tests on the held-out fold** (X-ARES's rotation; HEAR's probe validates on the
  next fold instead), the scores averaged over folds.
- **Metrics**: accuracy (multiclass), mAP (multilabel: macro average precision over the labels with
  positives), segment F1 macro (frame: frames thresholded at 0.5, max-pooled over 1 s windows,
  scikit-learn's macro F1 over the labels). Each result carries X-ARES's task weight for the
  weighted average (``xares.weight`` of an X-ARES task, else the number of test clips).

Where we differ from X-ARES, and why: X-ARES pads a batch's audio and averages the padded frames
too; our clip embedding excludes padding (each clip is embedded alone with its length). Its data
loader shuffles with webdataset's buffers; ours is a seeded permutation, so the MLP's batches
differ and its scores match X-ARES's within a tolerance, not to the digit (the k-NN has no
randomness and matches exactly). Frame tasks are pooled per clip over real frames only.
Everything runs on the CPU in float32: the same seed gives the same scores.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import sys
from dataclasses import asdict, dataclass
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

PROTOCOLS = ("xares_mlp", "xares_knn")
METRIC_OF = {"multiclass": "accuracy", "multilabel": "mAP", "frame": "segmentf1_macro"}


@dataclass
class MlpConfig:
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 32
    decay_fraction: float = 0.1

    @classmethod
    def from_dict(cls, d: dict | None) -> MlpConfig:
        return sections.from_section(cls, d, "evaluation.xares.mlp")


@dataclass
class KnnConfig:
    k: int = 10
    temperature: float = 0.07

    @classmethod
    def from_dict(cls, d: dict | None) -> KnnConfig:
        return sections.from_section(cls, d, "evaluation.xares.knn")


# -- the task as X-ARES sees it ---------------------------------------------------------------------


def task_kind(task: hear.Task) -> str:
    return "frame" if task.is_event else task.prediction_type


def task_info(task: hear.Task) -> dict:
    """X-ARES's view of a task folder: kind, metric, weight, name (from the ``xares`` block an X-ARES
    task carries; a HEAR task gets its kind's metric and its test size as weight)."""
    x = dict(task.metadata.get("xares") or {})
    kind = x.get("kind") or task_kind(task)
    return {
        "kind": kind,
        "metric": x.get("metric") or METRIC_OF[kind],
        "weight": x.get("weight"),
        "name": x.get("name") or task.name,
        "mlp": x.get("mlp") or {},
        "is_xares": bool(x),
    }


def xares_folds(task: hear.Task) -> list[hear.Fold]:
    """X-ARES's rotation: train/valid/test, or per fold i: train = the other folds, valid = test = fold i."""
    if task.split_mode == "trainvaltest":
        return [hear.Fold(0, ("train",), ("valid",), ("test",))]
    return [
        hear.Fold(i, tuple(s for s in task.splits if s != held), (held,), (held,))
        for i, held in enumerate(task.splits)
    ]


def frame_targets(
    events, timestamps: np.ndarray, hop_ms: float, index: dict[str, int], C: int
) -> np.ndarray:
    """X-ARES's frame labels: frame k is on for an event when ceil(onset / hop) <= k < ceil(offset / hop)."""
    n_frames = len(timestamps)
    y = np.zeros((n_frames, C), np.float32)
    for ev in events:
        a, b = math.ceil(ev.start_ms / hop_ms - 1e-9), math.ceil(ev.end_ms / hop_ms - 1e-9)
        y[max(0, a) : max(0, min(b, n_frames)), index[ev.label]] = 1.0
    return y


def load_data(task: hear.Task, emb_dir: Path, splits: tuple[str, ...]) -> SplitData:
    """X-ARES's inputs of ``splits``: clip embeddings, or frames with X-ARES's frame labels."""
    return inputs.load_splits(task, emb_dir, splits, frame_targets)


# -- metrics -------------------------------------------------------------------------------------------


def segment_f1_macro(
    logits: np.ndarray, target: np.ndarray, offsets: np.ndarray, window: int
) -> float:
    """X-ARES's segmentf1_macro per clip: round(sigmoid), max over whole windows of ``window`` frames."""
    from sklearn.metrics import f1_score

    preds, tars = [], []
    for i in range(len(offsets) - 1):
        a, b = int(offsets[i]), int(offsets[i + 1])
        n = (b - a) // window * window
        if n == 0:
            continue
        p = (logits[a : a + n] > 0).astype(np.int64)  # round(sigmoid(z)) == (z > 0)
        preds.append(p.reshape(-1, window, p.shape[1]).max(axis=1))
        tars.append(
            target[a : a + n].astype(np.int64).reshape(-1, window, target.shape[1]).max(axis=1)
        )
    if not preds:
        return float("nan")
    return float(
        f1_score(np.concatenate(tars), np.concatenate(preds), average="macro", zero_division=0)
    )


def score(metric: str, logits: np.ndarray, data: SplitData, window: int = 25) -> float:
    if metric == "accuracy":
        return float((logits.argmax(1) == data.y.argmax(1)).mean())
    if metric == "mAP":
        return metrics.mean_average_precision(data.y, logits)
    if metric == "segmentf1_macro":
        return segment_f1_macro(logits, data.y, data.offsets, window)
    raise ValueError(f"unknown X-ARES metric {metric!r}; expected accuracy, mAP or segmentf1_macro")


# -- k-NN ----------------------------------------------------------------------------------------------


def knn_predict(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    num_classes: int,
    k: int = 10,
    temperature: float = 0.07,
) -> np.ndarray:
    """X-ARES's k-NN class scores (n_test, C): ``train_y`` holds class indices."""
    if len(train_x) == 0 or len(test_x) == 0:
        raise ValueError(f"k-NN needs references and queries, got {len(train_x)} and {len(test_x)}")
    refs = nn.functional.normalize(
        torch.from_numpy(train_x).float().T, dim=1, p=2
    )  # (D, N), as X-ARES
    queries = nn.functional.normalize(torch.from_numpy(test_x).float(), dim=1, p=2)  # (B, D)
    labels = torch.from_numpy(train_y).long().view(1, -1)
    sims = queries @ refs  # (B, N)
    top, idx = sims.topk(min(k, refs.shape[1]), largest=True, sorted=True)  # (B, k)
    neighbours = torch.gather(labels.expand(len(sims), -1), 1, idx)  # (B, k)
    weights = torch.softmax(top / temperature, dim=1)  # (B, k)
    votes = nn.functional.one_hot(neighbours, num_classes) * weights[..., None]  # (B, k, C)
    return votes.sum(1).numpy()  # (B, C)


# -- MLP -----------------------------------------------------------------------------------------------


class XaresMlp(nn.Module):
    """X-ARES's probe: LayerNorm + Linear, (…, D) → (…, C)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.ln = nn.LayerNorm(in_dim)
        self.fc = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.ln(x))


def cosine_lr(lr: float, epoch: int, epochs: int, decay_fraction: float = 0.1) -> float:
    """The lr of 1-based ``epoch``, as ignite's CosineAnnealingScheduler(lr, lr·decay, epochs) sets it."""
    if epochs <= 1:
        return lr
    end = lr * decay_fraction
    return lr + (end - lr) / 2 * (1 - math.cos(math.pi * (epoch - 1) / epochs))


def _batches(data: SplitData, order: np.ndarray, batch_size: int):
    """Index arrays of rows per batch of ``batch_size`` items (clips; a frame task's clip is its frames)."""
    for i in range(0, len(order), batch_size):
        items = order[i : i + batch_size]
        if data.offsets is None:
            yield items
        else:
            yield np.concatenate([np.arange(data.offsets[j], data.offsets[j + 1]) for j in items])


def train_mlp(
    train: SplitData,
    valid: SplitData,
    kind: str,
    metric: str,
    cfg: MlpConfig,
    seed: int,
    window: int = 25,
) -> tuple[XaresMlp, dict]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = XaresMlp(train.x.shape[1], train.y.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    multiclass = kind == "multiclass"
    loss_fn = nn.CrossEntropyLoss() if multiclass else nn.BCEWithLogitsLoss()
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    target = y.argmax(1) if multiclass else y
    n_items = len(train.x) if train.offsets is None else len(train.offsets) - 1
    best, best_state, best_epoch, history = None, None, 0, []
    for epoch in range(1, cfg.epochs + 1):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(cfg.lr, epoch, cfg.epochs, cfg.decay_fraction)
        model.train()
        order = torch.randperm(n_items, generator=gen).numpy()
        for rows in _batches(train, order, cfg.batch_size):
            rows = torch.from_numpy(rows)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[rows]), target[rows])
            loss.backward()
            opt.step()
        val = score(metric, predict(model, valid.x), valid, window)
        history.append(val)
        if best is None or (not math.isnan(val) and val > best):
            best, best_epoch, best_state = val, epoch, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    return model, {"best_epoch": best_epoch, "val_score": best, "val_history": history}


def predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


# -- running a protocol on a task ------------------------------------------------------------------


def _score_fold(
    protocol: str, task: hear.Task, emb_dir: Path, fold: hear.Fold, info: dict, cfg: dict, seed: int
) -> dict:
    """The record of one fold: its test score, and the MLP's training record."""
    metric = info["metric"]
    tr, te = load_data(task, emb_dir, fold.train), load_data(task, emb_dir, fold.test)
    entry = {
        "index": fold.index,
        "train": list(fold.train),
        "valid": list(fold.valid),
        "test": list(fold.test),
        "n_train": int(len(tr.x)),
        "n_test": int(te.clips),
    }
    if protocol == "xares_knn":
        knn = cfg["knn"]
        votes = knn_predict(
            tr.x, tr.y.argmax(1), te.x, len(task.vocabulary), knn.k, knn.temperature
        )
        entry["score"] = score(metric, votes, te)
    else:
        va = te if fold.valid == fold.test else load_data(task, emb_dir, fold.valid)
        model, info_fit = train_mlp(tr, va, info["kind"], metric, cfg["mlp"], seed)
        entry.update(info_fit)
        entry["score"] = score(metric, predict(model, te.x), te)
    log.info(f"  fold {fold.index} (test {', '.join(fold.test)}): {metric} {entry['score']:.4f}")
    return entry


def _result_header(protocol, task, task_dir, meta, info, folds, cfg, seed, stamp_section) -> dict:
    return {
        **inputs.result_fields(protocol, meta, task, task_dir),
        "kind": info["kind"],
        "primary_metric": info["metric"],
        "xares_name": info["name"],
        "xares_format": info["is_xares"],
        "rotation": "k-fold: train on the other folds, validate and test on the held-out fold"
        if len(folds) > 1
        else "train / valid / test",
        "config": {"mlp": asdict(cfg["mlp"])}
        if protocol == "xares_mlp"
        else {"knn": asdict(cfg["knn"])},
        "seed": seed,
        "embeddings_provenance": meta.get("provenance"),
        "provenance": provenance.stamp(stamp_section, seed),
    }


def run(
    protocol: str,
    task_dir: str | Path,
    emb_dir: str | Path,
    seed: int,
    mlp: dict,
    knn: dict,
    threads: int,
    stamp_section: dict,
) -> dict:
    """Score one task's embeddings with ``protocol`` (``xares_mlp`` or ``xares_knn``); returns the result
    (``metrics[metric]`` = mean, std and per-fold scores, ``weight`` for X-ARES's weighted average;
    ``stamp_section``: what the provenance stamp hashes, the job's params)."""
    from tqdm import tqdm

    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    torch.set_num_threads(max(1, threads))
    task = hear.load_task(task_dir)
    emb_dir = Path(emb_dir)
    meta = load_meta(emb_dir)
    info = task_info(task)
    kind, metric = info["kind"], info["metric"]
    cfg = {"mlp": MlpConfig.from_dict({**mlp, **info["mlp"]}), "knn": KnnConfig.from_dict(knn)}
    folds = xares_folds(task)
    result = _result_header(protocol, task, task_dir, meta, info, folds, cfg, seed, stamp_section)
    if protocol == "xares_knn" and kind != "multiclass":
        log.info(
            f"X-ARES k-NN skipped for {task.name}: {kind} task (X-ARES runs k-NN on multiclass tasks only)"
        )
        return {**result, "skipped": f"{kind} task", "metrics": {}, "folds": [], "weight": None}
    desc = f"{protocol} {meta['model']}/{task.name}"
    out_folds = [
        _score_fold(protocol, task, emb_dir, fold, info, cfg, seed)
        for fold in tqdm(folds, desc=desc, unit="fold", file=sys.stdout)
    ]
    values = np.array([f["score"] for f in out_folds], np.float64)
    n_test = int(round(np.mean([f["n_test"] for f in out_folds])))
    summary = {
        "mean": float(np.nanmean(values)),
        "std": float(np.nanstd(values)),
        "folds": [float(v) for v in values],
    }
    log.info(f"{desc}: {metric} {summary['mean']:.4f} ± {summary['std']:.4f}")
    weight = info["weight"] if info["weight"] is not None else n_test
    return {
        **result,
        "metrics": {metric: summary},
        "folds": out_folds,
        "weight": int(weight),
        "n_test": n_test,
    }


def main(argv: list[str] | None = None) -> None:
    parser = inputs.scoring_parser(
        "dasheng_pipeline.evaluation.protocols.xares",
        __doc__,
        "seed, xares {mlp {epochs, lr, batch_size, decay_fraction}, knn {k, temperature}}",
    )
    parser.add_argument("--protocol", required=True, choices=PROTOCOLS)
    args = parser.parse_args(argv)
    logs.setup()
    params = json.loads(args.params)
    seed, x, task, emb = int(params["seed"]), params["xares"], args.task, args.embeddings
    with logs.one_line_errors():
        result = run(args.protocol, task, emb, seed, x["mlp"], x["knn"], args.threads, params)
    atomic.write_json(args.out, result)


if __name__ == "__main__":
    main()
