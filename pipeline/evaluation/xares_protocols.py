"""X-ARES's two protocols on frozen embeddings: ``python -m dasheng_pipeline.evaluation.xares_protocols``.

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
from dasheng_pipeline.evaluation import hear_tasks, metrics
from dasheng_pipeline.evaluation.embeddings import load_meta, load_split

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


def task_kind(task: hear_tasks.Task) -> str:
    return "frame" if task.is_event else task.prediction_type


def task_info(task: hear_tasks.Task) -> dict:
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


def xares_folds(task: hear_tasks.Task) -> list[hear_tasks.Fold]:
    """X-ARES's rotation: train/valid/test, or per fold i: train = the other folds, valid = test = fold i."""
    if task.split_mode == "trainvaltest":
        return [hear_tasks.Fold(0, ("train",), ("valid",), ("test",))]
    return [
        hear_tasks.Fold(i, tuple(s for s in task.splits if s != held), (held,), (held,))
        for i, held in enumerate(task.splits)
    ]


@dataclass
class Data:
    x: np.ndarray  # (N, D) clip embeddings, or (ΣT, D) frames for frame tasks
    y: np.ndarray  # (N, C) or (ΣT, C) float32 multi-hot
    offsets: np.ndarray | None = None  # frame tasks: clip i is rows offsets[i]:offsets[i+1]


def frame_targets(
    events, n_frames: int, hop_ms: float, index: dict[str, int], C: int
) -> np.ndarray:
    """X-ARES's frame labels: frame k is on for an event when ceil(onset / hop) <= k < ceil(offset / hop)."""
    y = np.zeros((n_frames, C), np.float32)
    for ev in events:
        a, b = math.ceil(ev.start_ms / hop_ms - 1e-9), math.ceil(ev.end_ms / hop_ms - 1e-9)
        y[max(0, a) : max(0, min(b, n_frames)), index[ev.label]] = 1.0
    return y


def load_data(task: hear_tasks.Task, emb_dir: Path, splits: tuple[str, ...]) -> Data:
    index, C = task.label_index, len(task.vocabulary)
    xs, ys, offs = [], [], [0]
    for split in splits:
        arr = load_split(emb_dir, split)
        labels = task.split_labels(split)
        names = [str(f) for f in arr["files"]]
        if task.is_event:
            if "frames" not in arr:
                raise ValueError(
                    f"{emb_dir}/{split}.npz has no frame embeddings; a frame task needs them"
                )
            ts = arr["timestamps"]
            hop = float(np.median(np.diff(ts[: min(len(ts), 50)]))) if len(ts) > 1 else 40.0
            for i, name in enumerate(names):
                a, b = int(arr["offsets"][i]), int(arr["offsets"][i + 1])
                xs.append(arr["frames"][a:b])
                ys.append(frame_targets(labels[name], b - a, hop, index, C))
                offs.append(offs[-1] + b - a)
        else:
            y = np.zeros((len(names), C), np.float32)
            for i, name in enumerate(names):
                for lab in labels[name]:
                    y[i, index[lab]] = 1.0
            xs.append(arr["clip"])
            ys.append(y)
    x = np.concatenate(xs).astype(np.float32)
    return Data(x, np.concatenate(ys), np.array(offs, np.int64) if task.is_event else None)


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


def score(metric: str, logits: np.ndarray, data: Data, window: int = 25) -> float:
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


def _batches(data: Data, order: np.ndarray, batch_size: int):
    """Index arrays of rows per batch of ``batch_size`` items (clips; a frame task's clip is its frames)."""
    for i in range(0, len(order), batch_size):
        items = order[i : i + batch_size]
        if data.offsets is None:
            yield items
        else:
            yield np.concatenate([np.arange(data.offsets[j], data.offsets[j + 1]) for j in items])


def train_mlp(
    train: Data, valid: Data, kind: str, metric: str, cfg: MlpConfig, seed: int, window: int = 25
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


def run(
    protocol: str,
    task_dir: str | Path,
    emb_dir: str | Path,
    seed: int = 0,
    mlp: dict | None = None,
    knn: dict | None = None,
    threads: int = 1,
    stamp_section: dict | None = None,
) -> dict:
    """Score one task's embeddings with ``protocol`` (``xares_mlp`` or ``xares_knn``); returns the result
    (``metrics[metric]`` = mean, std and per-fold scores, ``weight`` for X-ARES's weighted average)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    torch.set_num_threads(max(1, threads))
    task = hear_tasks.load_task(task_dir)
    emb_dir = Path(emb_dir)
    meta = load_meta(emb_dir)
    info = task_info(task)
    kind, metric = info["kind"], info["metric"]
    mlp_cfg = MlpConfig.from_dict({**(mlp or {}), **info["mlp"]})
    knn_cfg = KnnConfig.from_dict(knn)
    folds = xares_folds(task)
    result = {
        "method": protocol,
        "model": meta["model"],
        "task": task.name,
        "task_dir": str(task_dir),
        "task_mode": task.metadata.get("mode"),
        "domain": task.metadata.get("domain"),
        "embedding_type": task.embedding_type,
        "split_mode": task.split_mode,
        "kind": kind,
        "primary_metric": metric,
        "xares_name": info["name"],
        "xares_format": info["is_xares"],
        "rotation": "k-fold: train on the other folds, validate and test on the held-out fold"
        if len(folds) > 1
        else "train / valid / test",
        "config": {"mlp": asdict(mlp_cfg)} if protocol == "xares_mlp" else {"knn": asdict(knn_cfg)},
        "seed": seed,
        "embeddings_provenance": meta.get("provenance"),
        "provenance": provenance.stamp(
            stamp_section
            if stamp_section is not None
            else {"protocol": protocol, "mlp": asdict(mlp_cfg), "knn": asdict(knn_cfg)},
            seed,
        ),
    }
    if protocol == "xares_knn" and kind != "multiclass":
        log.info(
            f"X-ARES k-NN skipped for {task.name}: {kind} task (X-ARES runs k-NN on multiclass tasks only)"
        )
        return {**result, "skipped": f"{kind} task", "metrics": {}, "folds": [], "weight": None}
    from tqdm import tqdm

    out_folds = []
    for fold in tqdm(
        folds, desc=f"{protocol} {meta['model']}/{task.name}", unit="fold", file=sys.stdout
    ):
        tr, te = load_data(task, emb_dir, fold.train), load_data(task, emb_dir, fold.test)
        entry = {
            "index": fold.index,
            "train": list(fold.train),
            "valid": list(fold.valid),
            "test": list(fold.test),
            "n_train": int(len(tr.x)),
            "n_test": int(len(te.x) if te.offsets is None else len(te.offsets) - 1),
        }
        if protocol == "xares_knn":
            votes = knn_predict(
                tr.x, tr.y.argmax(1), te.x, len(task.vocabulary), knn_cfg.k, knn_cfg.temperature
            )
            entry["score"] = score(metric, votes, te)
        else:
            va = te if fold.valid == fold.test else load_data(task, emb_dir, fold.valid)
            model, info_fit = train_mlp(tr, va, kind, metric, mlp_cfg, seed)
            entry.update(info_fit)
            entry["score"] = score(metric, predict(model, te.x), te)
        out_folds.append(entry)
        log.info(
            f"  fold {fold.index} (test {', '.join(fold.test)}): {metric} {entry['score']:.4f}"
        )
    values = np.array([f["score"] for f in out_folds], np.float64)
    n_test = int(round(np.mean([f["n_test"] for f in out_folds])))
    summary = {
        "mean": float(np.nanmean(values)),
        "std": float(np.nanstd(values)),
        "folds": [float(v) for v in values],
    }
    log.info(
        f"{protocol} {meta['model']}/{task.name}: {metric} {summary['mean']:.4f} ± {summary['std']:.4f}"
    )
    weight = info["weight"] if info["weight"] is not None else n_test
    return {
        **result,
        "metrics": {metric: summary},
        "folds": out_folds,
        "weight": int(weight),
        "n_test": n_test,
    }


def evaluate_task(
    task: str | Path | dict,
    model: dict,
    protocol: str,
    work_dir: str | Path,
    *,
    name: str | None = None,
    model_name: str = "model",
    seed: int = 0,
    batch_size: int = 16,
    threads: int = 1,
    mlp: dict | None = None,
    knn: dict | None = None,
) -> dict:
    """Evaluate one task for one encoder with one protocol, end to end, and return the result dict.

    ``task``: a HEAR task folder, or an X-ARES task's config (``{"path": ..., "label": ..., "kind": ...,
    "splits" | "folds": ...}``, as under ``evaluation.tasks``), converted first into
    ``work_dir/task``; ``model``: a model spec as under ``models:`` (``{"type": "checkpoint", "path":
    ...}``, ``{"type": "random", "size": "base"}``, ``{"type": "logmel"}``); ``protocol``: ``xares_mlp``
    or ``xares_knn``. The embeddings go to ``work_dir/embeddings/<model_name>`` (reused when there).
    The score is ``result["metrics"][result["primary_metric"]]["mean"]``.
    """
    from dasheng_pipeline.evaluation import embeddings, xares_tasks

    work_dir = Path(work_dir)
    if isinstance(task, dict):
        spec = xares_tasks.XaresSpec.from_config(name or Path(task["path"]).name, task)
        task_dir = work_dir / "task"
        if not (task_dir / "task_metadata.json").is_file():
            xares_tasks.convert(spec, task_dir, seed)
    else:
        task_dir = Path(task)
    emb_dir = work_dir / "embeddings" / model_name
    if not (emb_dir / "meta.json").is_file():
        embeddings.run(
            task_dir, model_name, model, {"seed": seed, "batch_size": batch_size}, emb_dir, threads
        )
    return run(protocol, task_dir, emb_dir, seed, mlp, knn, threads)


def main(argv: list[str] | None = None) -> None:
    parser = hear_tasks.scoring_parser(
        "dasheng_pipeline.evaluation.xares_protocols",
        __doc__,
        "seed, xares {mlp {epochs, lr, batch_size}, knn {k, temperature}}",
    )
    parser.add_argument("--protocol", required=True, choices=PROTOCOLS)
    args = parser.parse_args(argv)
    logs.setup()
    params = json.loads(args.params)
    x = params.get("xares", {})
    with logs.one_line_errors():
        result = run(
            args.protocol,
            args.task,
            args.embeddings,
            int(params.get("seed", 0)),
            x.get("mlp"),
            x.get("knn"),
            args.threads,
            params,
        )
    atomic.write_json(args.out, result)


if __name__ == "__main__":
    main()
