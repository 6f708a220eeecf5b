"""Train a classifier on a Dasheng encoder: ``dasheng-pipeline finetune`` and :func:`finetune`.

    from dasheng_pipeline.tools.finetune import finetune
    result = finetune("words/", "random:tiny", "clf/", mode="mlp")

DATA is a folder with one subfolder per class (every audio file under ``DATA/<class>/``; folders
whose name starts with ``_`` or ``.``, such as Speech Commands' ``_background_noise_``, are not
classes and are left out), or a CSV with the columns ``path,label[,split]``: paths relative to the
CSV's folder, several labels ``;``-separated (any such row makes the task multi-label), ``split``
one of ``train``, ``valid``, ``test``. A row or file that cannot be used goes to ``OUT/rejects.csv``
with its reason; the run goes on without it.

Modes:

- ``linear``, ``mlp``: the encoder frozen. Clip embeddings (the mean of the 25 Hz frames, as
  ``embed`` computes them) are cached once in ``OUT/embeddings.parquet`` (a rerun reuses them),
  standardised with the training split's mean and std, and fed to one Linear layer (``linear``) or
  to HEAR's MLP with one hidden layer of 1024 units (``mlp``: Linear → BatchNorm → Dropout 0.1 →
  ReLU → Linear). Adam, batches of 256, ``epochs`` (default 100) with early stopping after 20
  epochs without a better validation score; the best epoch's weights are kept.
- ``full``: the encoder trained too, with a linear head on the mean of its frames. The head starts
  as a linear probe on the pre-trained encoder's embeddings (as ``linear`` mode: "LP-FT"), then
  the encoder and the head are trained together: AdamW (weight
  decay 0.05 except on norms, biases and positions), layer-wise learning-rate decay (block i of
  depth L gets ``lr · layer_decay^(L - i)``, the patch embedding and positions ``layer_decay^(L+1)``),
  one warm-up epoch then a cosine schedule, random crops of at most 10.08 s, SpecAugment-style
  masking on the log-mel (one frequency mask of up to 8 bins, one time mask of up to 20 % of the
  crop, both filled with the clip's mean), optional mixup (``mixup`` = the Beta's alpha). The
  mel batch norm ("init_bn") keeps its pre-trained statistics. Evaluation embeds whole clips in
  10.08 s windows as ``embed`` does. Default ``epochs`` 10, ``lr`` 1e-4.

Single-label data: cross-entropy, accuracy. Multi-label: binary cross-entropy, mAP (macro over the
labels with a positive and a negative in the set scored, as HEAR). Early stopping and the best
epoch use the validation metric, ties broken by the lower validation loss; without a validation
split the last epoch is kept.

Splits: the CSV's ``split`` column when present. Otherwise a stratified train/valid/test split by
``seed`` (``sklearn.model_selection.train_test_split``); when a class is too small for that (fewer
than 2 examples, or fewer examples in a split than classes), a warning, and each class is split
on its own: 1 example → train (never scored), 2 → train + test, 3 or more → one test example at
least, and valid only after two train examples (3 → 2 train + 1 test, 4 → 2 + 1 valid + 1 test),
by the fractions beyond that. (A validation example per tiny class would cost training data for a
noisy early stop; without validation examples the last epoch is kept.) Multi-label data is split at random (not
stratified). ``folds=K``: K-fold cross-validation (``StratifiedKFold``, or ``KFold`` for
multi-label data or when no class has K examples): fold k is the test set, fold k+1 the
validation set, the rest the training set; the metrics are the mean ± std over folds, the
per-class table and the confusion matrix pool every example's out-of-fold prediction, and the
classifier written is the one trained on fold 0 (its curve is ``curve.csv``).

Writes in OUT (atomically; the same data, model and seed give the same files):
``classifier.safetensors`` (``head.*``: the standardisation and the layers; full mode also the
fine-tuned encoder under ``encoder.*``), ``classifier.json`` (labels, multilabel, mode, model spec
and sha256, encoder config, head config, training config, provenance), ``metrics.json``,
``per_class.csv``, ``confusion.png`` (single-label) or ``per_class_ap.png`` (multi-label),
``curve.csv`` + ``curve.png`` (training loss, validation loss and metric per epoch), ``splits.csv``
(each example's path, labels and split; with folds also its test fold), ``rejects.csv``, and for the
frozen modes the cache ``embeddings.parquet``.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dasheng_model.encoder import MAX_TOKENS, DashengEncoder
from dasheng_model.inputs import FRAMES_PER_TOKEN
from dasheng_pipeline.common import atomic, audio, provenance
from dasheng_pipeline.evaluation import metrics
from dasheng_pipeline.tools import inputs
from dasheng_pipeline.tools.classifier import Head, build_head, encoder_meta, head_config
from dasheng_pipeline.tools.classifier import probabilities as scores
from dasheng_pipeline.tools.classifier import save as save_classifier
from dasheng_pipeline.tools.embed import (
    Model,
    autocast,
    embed_files,
    read_embeddings,
    read_rejects,
    rejects_path,
)

log = logging.getLogger(__name__)

MODES = ("linear", "mlp", "full")
FROZEN = ("linear", "mlp")
SPLITS = ("train", "valid", "test")
DEFAULTS = {
    "epochs": {"linear": 100, "mlp": 100, "full": 10},
    "lr": {"linear": 1e-3, "mlp": 1e-3, "full": 1e-4},
}
HEAD_BATCH = 256  # frozen modes: embeddings per step
PATIENCE = 20  # frozen modes: epochs without a better validation score before stopping
PROBE_EPOCHS, PROBE_LR = 100, 1e-3  # full mode: the linear probe that initialises the head
WEIGHT_DECAY = 0.05  # full mode
CROP_FRAMES = MAX_TOKENS * FRAMES_PER_TOKEN  # 1008 mel frames: 10.08 s, the longest training crop
FREQ_MASK_BINS = 8
TIME_MASK_FRACTION = 0.2


class FinetuneError(ValueError):
    """DATA or an argument that cannot be used (one line: what is wrong, what to do)."""


# -- data --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    item: inputs.Item
    labels: tuple[str, ...]
    split: str | None = None  # from the CSV


@dataclass
class Data:
    examples: list[Example]
    labels: list[str]
    multilabel: bool
    rejects: list[tuple[str, str]] = field(default_factory=list)  # (what, reason)


def _from_folder(folder: Path) -> Data:
    classes = sorted(
        d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(("_", "."))
    )
    left_out = sorted(
        d.name for d in folder.iterdir() if d.is_dir() and d.name.startswith(("_", "."))
    )
    if left_out:
        log.info(
            f"{folder}: left out {', '.join(left_out)} (folders starting with _ or . are not classes)"
        )
    examples, rejects = [], []
    for d in classes:
        items, bad = inputs.collect([d])
        examples += [Example(i, (d.name,)) for i in items]
        rejects += [(r.path, r.reason) for r in bad]
    used = {e.labels[0] for e in examples}
    empty = [d.name for d in classes if d.name not in used]
    if empty:
        log.warning(f"{folder}: no audio files in {', '.join(empty)}; not classes")
    return Data(examples, [d.name for d in classes if d.name in used], False, rejects)


def _from_csv(path: Path) -> Data:
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))
    except (OSError, UnicodeDecodeError) as exc:
        raise FinetuneError(f"{path}: cannot read this CSV ({exc})") from exc
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if "path" not in header or "label" not in header:
        raise FinetuneError(
            f"{path}: expected a header row with the columns path,label[,split], got {header}"
        )
    ip, il = header.index("path"), header.index("label")
    isplit = header.index("split") if "split" in header else None
    examples, rejects, seen = [], [], {}
    for n, row in enumerate(rows[1:], start=2):
        cell = {
            k: (row[i].strip() if i is not None and i < len(row) else "")
            for k, i in (("path", ip), ("label", il), ("split", isplit))
        }
        labels = tuple(sorted({x.strip() for x in cell["label"].split(";") if x.strip()}))
        split = cell["split"].lower() if isplit is not None else None
        file = (
            Path(cell["path"]) if Path(cell["path"]).is_absolute() else path.parent / cell["path"]
        )
        if not cell["path"]:
            reason = "no path"
        elif not labels:
            reason = "no label"
        elif split is not None and split not in SPLITS:
            reason = f"split {split!r}: expected one of {', '.join(SPLITS)}"
        elif str(file) in seen:
            reason = f"{file} is listed twice (first on row {seen[str(file)]})"
        elif not file.is_file():
            reason = f"{file}: {'a folder, not a file' if file.is_dir() else 'no such file'}"
        elif file.suffix.lower() not in inputs.AUDIO_SUFFIXES:
            reason = f"{file}: not an audio file name (expected one of {' '.join(sorted(inputs.AUDIO_SUFFIXES))})"
        else:
            items, bad = inputs.collect([file])
            reason = bad[0].reason if bad else None
        if reason:
            rejects.append((f"{path} row {n}", reason))
            continue
        seen[str(file)] = n
        examples.append(Example(items[0], labels, split))
    labels = sorted({lab for e in examples for lab in e.labels})
    return Data(examples, labels, any(len(e.labels) > 1 for e in examples), rejects)


def read_data(data: str | Path) -> Data:
    """DATA (a folder of class folders, or a CSV) → examples, labels and the rows left out."""
    data = Path(data).expanduser()
    if data.is_dir():
        result = _from_folder(data)
    elif data.is_file() and data.suffix.lower() == ".csv":
        result = _from_csv(data)
    else:
        raise FinetuneError(
            f"DATA {data}: expected a folder with one subfolder per class, or a .csv file with "
            "the columns path,label[,split]"
        )
    if len(result.labels) < 2:
        raise FinetuneError(
            f"DATA {data}: found {len(result.labels)} class(es) with audio files "
            f"({len(result.examples)} files); a classifier needs at least 2"
        )
    given = {e.split for e in result.examples}
    if given != {None} and "train" not in given:
        raise FinetuneError(f"DATA {data}: the split column names no 'train' rows")
    return result


# -- splits ------------------------------------------------------------------------------------


def _split_per_class(
    keys: list[str], valid_fraction: float, test_fraction: float, seed: int
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    assign = np.full(len(keys), "train", dtype=object)
    for key in sorted(set(keys)):
        members = rng.permutation([i for i, k in enumerate(keys) if k == key])
        n = len(members)
        n_test = max(1, round(n * test_fraction)) if test_fraction > 0 and n >= 2 else 0
        n_valid = round(n * valid_fraction)
        keep = min(n - n_test, 2)  # two to train on before any validates, one at least
        n_valid = max(0, min(n_valid, n - n_test - keep))
        assign[members[:n_test]] = "test"
        assign[members[n_test : n_test + n_valid]] = "valid"
    return assign


def split_once(
    keys: list[str], valid_fraction: float, test_fraction: float, seed: int, stratify: bool = True
) -> np.ndarray:
    """One train/valid/test assignment (an array of split names) of examples with class ``keys``."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(keys))
    assign = np.full(len(keys), "train", dtype=object)
    try:
        rest = idx
        if test_fraction > 0:
            rest, test = train_test_split(
                idx, test_size=test_fraction, random_state=seed, stratify=keys if stratify else None
            )
            assign[test] = "test"
        if valid_fraction > 0:
            _, valid = train_test_split(
                rest,
                test_size=valid_fraction / (1 - test_fraction),
                random_state=seed,
                stratify=[keys[i] for i in rest] if stratify else None,
            )
            assign[valid] = "valid"
        return assign
    except ValueError as exc:
        if not stratify:
            raise FinetuneError(
                f"cannot split {len(keys)} examples into train/valid/test ({exc}); "
                "lower --valid-fraction/--test-fraction or give a split column"
            ) from exc
        counts = {k: keys.count(k) for k in set(keys)}
        small = sorted(k for k, c in counts.items() if c < 3)
        log.warning(
            f"a stratified split is impossible ({str(exc).split('.')[0]}); each class is split on its "
            f"own instead: {len(small)} of {len(counts)} classes have fewer than 3 examples "
            f"({sum(counts[k] == 1 for k in small)} with one, which only train and are never scored), "
            "classes of fewer than 4 give no validation example"
        )
        return _split_per_class(keys, valid_fraction, test_fraction, seed)


def split_folds(keys: list[str], k: int, seed: int, stratify: bool = True) -> list[np.ndarray]:
    """K assignments: fold i tests, fold i+1 validates (none for K=2), the rest trains."""
    import warnings

    from sklearn.model_selection import KFold, StratifiedKFold

    idx = np.arange(len(keys))
    if k > len(keys):
        raise FinetuneError(f"--folds {k}: more folds than examples ({len(keys)})")
    parts = None
    if stratify:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                parts = [
                    test
                    for _, test in StratifiedKFold(k, shuffle=True, random_state=seed).split(
                        idx, keys
                    )
                ]
            for w in caught:
                log.warning(f"--folds {k}: {w.message}")
        except ValueError as exc:
            log.warning(f"--folds {k}: stratified folds impossible ({exc}); plain K-fold instead")
    if parts is None:
        parts = [test for _, test in KFold(k, shuffle=True, random_state=seed).split(idx)]
    out = []
    for i in range(k):
        assign = np.full(len(keys), "train", dtype=object)
        if k > 2:
            assign[parts[(i + 1) % k]] = "valid"
        assign[parts[i]] = "test"
        out.append(assign)
    return out


# -- the classifier ----------------------------------------------------------------------------


def _loss(logits: torch.Tensor, target: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """target: (B, C) multi-hot, or soft (mixup) rows summing to 1."""
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, target)
    return F.cross_entropy(logits, target)


def _metric(y: np.ndarray, p: np.ndarray, multilabel: bool) -> float:
    return metrics.mean_average_precision(y, p) if multilabel else metrics.top1_acc(y, p)


def _better(new: tuple[float, float], old: tuple[float, float] | None) -> bool:
    """(metric, loss): a higher metric, or the same metric and a lower loss."""
    if old is None:
        return True
    if math.isnan(new[0]) or (not math.isnan(old[0]) and new[0] != old[0]):
        return not math.isnan(new[0]) and (math.isnan(old[0]) or new[0] > old[0])
    return new[1] < old[1]


# -- one training run --------------------------------------------------------------------------


@dataclass
class Fit:
    state: dict  # the best epoch's weights
    curve: list[dict]
    best_epoch: int


def _fit(epochs: int, run_epoch, evaluate, module: nn.Module, patience: int | None) -> Fit:
    """The loop both modes share: ``run_epoch(epoch)`` → training loss; ``evaluate()`` → (valid
    loss, valid metric) or None without a validation split. Keeps the best epoch's state."""
    best, best_state, best_epoch, bad, curve = None, None, 0, 0, []
    for epoch in range(1, epochs + 1):
        train_loss = run_epoch(epoch)
        valid = evaluate()
        curve.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "valid_loss": valid[0] if valid else None,
                "valid_metric": valid[1] if valid else None,
            }
        )
        if valid is None:
            best_state, best_epoch = None, epoch
            continue
        if _better((valid[1], valid[0]), best):
            best, best_epoch, bad = (valid[1], valid[0]), epoch, 0
            best_state = copy.deepcopy(module.state_dict())
        else:
            bad += 1
            if patience is not None and bad >= patience:
                break
    if best_state is not None:
        module.load_state_dict(best_state)
    return Fit(
        {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}, curve, best_epoch
    )


@dataclass
class Setup:
    mode: str
    multilabel: bool
    epochs: int
    lr: float
    layer_decay: float
    mixup: float
    seed: int
    batch_size: int


def _head_logits(head: Head, x: torch.Tensor) -> torch.Tensor:
    head.eval()
    with torch.no_grad():
        return torch.cat([head(x[i : i + 4096]) for i in range(0, len(x), 4096)])


def train_frozen(x: np.ndarray, y: np.ndarray, assign: np.ndarray, s: Setup) -> tuple[Head, Fit]:
    """Clip embeddings (n, D) and targets (n, C) → the head trained on ``assign == "train"``."""
    torch.manual_seed(s.seed)
    gen = torch.Generator().manual_seed(s.seed)
    tr, va = assign == "train", assign == "valid"
    xt, yt = torch.from_numpy(x[tr]), torch.from_numpy(y[tr])
    xv, yv = torch.from_numpy(x[va]), torch.from_numpy(y[va])
    head = build_head(head_config(s.mode, x.shape[1], y.shape[1]))
    head.mean.copy_(xt.mean(0))
    head.std.copy_(xt.std(0, unbiased=False).clamp(min=1e-6))
    opt = torch.optim.Adam(head.parameters(), lr=s.lr)
    min_batch = 2 if s.mode == "mlp" else 1  # BatchNorm needs two items; a lone leftover waits

    def run_epoch(epoch: int) -> float:
        head.train()
        order = torch.randperm(len(xt), generator=gen)
        total, count = 0.0, 0
        for i in range(0, len(order), HEAD_BATCH):
            idx = order[i : i + HEAD_BATCH]
            if len(idx) < min_batch:
                continue
            opt.zero_grad(set_to_none=True)
            loss = _loss(head(xt[idx]), yt[idx], s.multilabel)
            loss.backward()
            opt.step()
            total, count = total + loss.item() * len(idx), count + len(idx)
        return total / max(count, 1)

    def evaluate():
        if not len(xv):
            return None
        logits = _head_logits(head, xv)
        return float(_loss(logits, yv, s.multilabel)), _metric(
            y[va], scores(logits, s.multilabel).numpy(), s.multilabel
        )

    return head, _fit(s.epochs, run_epoch, evaluate, head, PATIENCE)


class FineTuner(nn.Module):
    """Encoder + head: dB log-mel (B, 64, T ≤ 1008) → logits (B, C) from the mean of the real frames."""

    def __init__(self, encoder: DashengEncoder, head: Head):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, mel: torch.Tensor, valid_frames: torch.Tensor) -> torch.Tensor:
        frames = self.encoder.forward_mel(mel, valid_frames)  # (B, N, D)
        n = (valid_frames // FRAMES_PER_TOKEN).clamp(min=1).to(frames.device)  # (B,) real tokens
        real = torch.arange(frames.shape[1], device=frames.device) < n[:, None]  # (B, N)
        clip = (frames.float() * real[..., None]).sum(1) / n[:, None]  # (B, D)
        return self.head(clip)


def layer_decay_groups(
    encoder: DashengEncoder,
    head: nn.Module,
    lr: float,
    decay: float,
    weight_decay: float = WEIGHT_DECAY,
) -> list[dict]:
    """AdamW parameter groups: block i of L gets lr·decay^(L − i), the layers before the blocks
    (mel batch norm, patch embedding, positions) lr·decay^(L + 1), the final norm and the head lr;
    no weight decay on 1-d parameters (norms, biases) and positions."""
    depth = len(encoder.blocks)
    groups: dict[tuple[int, bool], dict] = {}

    def layer(name: str) -> int:
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return depth + 1 if name.startswith("norm.") else 0

    named = [(n, p, layer(n)) for n, p in encoder.named_parameters()] + [
        (n, p, depth + 1) for n, p in head.named_parameters()
    ]
    for name, p, depth_id in named:
        no_decay = p.ndim == 1 or name.endswith("pos_embed")
        group = groups.setdefault(
            (depth_id, no_decay),
            {
                "params": [],
                "lr": lr * decay ** (depth + 1 - depth_id),
                "weight_decay": 0.0 if no_decay else weight_decay,
            },
        )
        group["params"].append(p)
    for g in groups.values():
        g["initial_lr"] = g["lr"]
    return [groups[k] for k in sorted(groups)]


def spec_augment(mel: torch.Tensor) -> torch.Tensor:
    """One frequency and one time mask per item (B, 64, T), filled with the item's mean (the torch seed draws them)."""
    from torchaudio.transforms import FrequencyMasking, TimeMasking

    mean = mel.mean(dim=(1, 2), keepdim=True)  # (B, 1, 1)
    x = (mel - mean)[:, None]  # (B, 1, 64, T): masked values become 0, i.e. the mean
    x = FrequencyMasking(FREQ_MASK_BINS, iid_masks=True)(x)
    x = TimeMasking(
        max(1, int(mel.shape[-1] * TIME_MASK_FRACTION)), iid_masks=True, p=TIME_MASK_FRACTION
    )(x)
    return x[:, 0] + mean


def _crop_batch(
    mels: list[torch.Tensor], gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mels (64, T_i) → a padded batch (B, 64, T ≤ 1008) of random crops and their lengths (B,)."""
    crops = []
    for m in mels:
        t = m.shape[1]
        start = (
            int(torch.randint(0, t - CROP_FRAMES + 1, (1,), generator=gen))
            if t > CROP_FRAMES
            else 0
        )
        crops.append(m[:, start : start + CROP_FRAMES])
    valid = torch.tensor([c.shape[1] for c in crops])
    batch = torch.zeros(len(crops), crops[0].shape[0], int(valid.max()))
    for i, c in enumerate(crops):
        batch[i, :, : c.shape[1]] = c
    return batch, valid


def clip_embeddings(model: Model, mels: list[torch.Tensor], batch_size: int) -> torch.Tensor:
    """Whole clips through the (current) encoder in 10.08 s windows → clip embeddings (n, D)."""
    return torch.stack([f.mean(0) for f in model.frames(mels, batch_size)])


def train_full(
    model: Model,
    mels: list[torch.Tensor],
    y: np.ndarray,
    assign: np.ndarray,
    s: Setup,
    progress: bool,
) -> tuple[FineTuner, Fit]:
    """The encoder and a linear head trained on the training clips' log-mels."""
    from tqdm import tqdm

    torch.manual_seed(s.seed)
    gen = torch.Generator().manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    train_idx = np.flatnonzero(assign == "train")
    valid_idx = np.flatnonzero(assign == "valid")
    encoder = copy.deepcopy(model.encoder).to(model.device)
    net = FineTuner(encoder, build_head(head_config("full", encoder.embed_dim, y.shape[1]))).to(
        model.device
    )
    tuned = Model(model.spec, encoder, model.sha256, model.device, model.dtype)
    # LP-FT: the head starts as a linear probe on the pre-trained encoder's clip embeddings (with
    # their standardisation, fixed afterwards), so the encoder's first steps follow a useful head.
    probe_idx = np.flatnonzero(assign != "test")
    x0 = np.zeros((len(mels), encoder.embed_dim), np.float32)
    x0[probe_idx] = clip_embeddings(tuned, [mels[i] for i in probe_idx], s.batch_size).cpu().numpy()
    probe_setup = Setup(
        "linear", s.multilabel, PROBE_EPOCHS, PROBE_LR, s.layer_decay, 0.0, s.seed, s.batch_size
    )
    probe, _ = train_frozen(x0, y, assign, probe_setup)
    net.head.load_state_dict(probe.state_dict())
    opt = torch.optim.AdamW(layer_decay_groups(encoder, net.head, s.lr, s.layer_decay))
    steps_per_epoch = max(1, math.ceil(len(train_idx) / s.batch_size))
    total, warmup = s.epochs * steps_per_epoch, steps_per_epoch

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    yt = torch.from_numpy(y)
    bar = tqdm(
        total=total,
        unit="step",
        desc="fine-tune",
        disable=not progress,
        file=sys.stderr,
        mininterval=2,
    )

    def run_epoch(epoch: int) -> float:
        net.train()
        encoder.init_bn.eval()  # keep the pre-trained mel statistics
        order = train_idx[torch.randperm(len(train_idx), generator=gen).numpy()]
        loss_sum, count = 0.0, 0
        for b in range(0, len(order), s.batch_size):
            idx = order[b : b + s.batch_size]
            mel, valid = _crop_batch([mels[i] for i in idx], gen)
            mel = spec_augment(mel)
            target = yt[idx]
            if s.mixup > 0 and len(idx) > 1:
                lam = float(rng.beta(s.mixup, s.mixup))
                perm = torch.randperm(len(idx), generator=gen)
                mel = lam * mel + (1 - lam) * mel[perm]
                valid = torch.maximum(valid, valid[perm])
                target = lam * target + (1 - lam) * target[perm]
            with autocast(model.device, model.dtype):
                logits = net(mel.to(model.device), valid.to(model.device))
            loss = _loss(logits.float(), target.to(model.device), s.multilabel)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum, count = loss_sum + loss.item() * len(idx), count + len(idx)
            bar.update(1)
        return loss_sum / max(count, 1)

    def evaluate():
        if not len(valid_idx):
            return None
        logits = _full_logits(net, tuned, [mels[i] for i in valid_idx], s.batch_size)
        return (
            float(_loss(logits, yt[valid_idx], s.multilabel)),
            _metric(y[valid_idx], scores(logits, s.multilabel).numpy(), s.multilabel),
        )

    fit = _fit(s.epochs, run_epoch, evaluate, net, None)
    bar.close()
    net.eval()
    return net, fit


def _full_logits(
    net: FineTuner, tuned: Model, mels: list[torch.Tensor], batch_size: int
) -> torch.Tensor:
    net.eval()
    with torch.no_grad():
        return net.head(clip_embeddings(tuned, mels, batch_size).to(tuned.device)).float().cpu()


# -- the run -----------------------------------------------------------------------------------


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
        )


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


def _targets(examples: list[Example], labels: list[str]) -> np.ndarray:
    index = {lab: i for i, lab in enumerate(labels)}
    y = np.zeros((len(examples), len(labels)), np.float32)  # (n, C) multi-hot
    for i, e in enumerate(examples):
        y[i, [index[lab] for lab in e.labels]] = 1.0
    return y


def _frozen_features(
    data: Data, model: Model, out: Path, batch_size: int, progress: bool
) -> np.ndarray | None:
    """Clip embeddings of every example, from the cache ``OUT/embeddings.parquet`` (filled as needed);
    examples whose file fails to decode are moved to ``data.rejects``. Returns (n, D) float32."""
    cache = out / "embeddings.parquet"
    embed_files(
        [e.item.path for e in data.examples],
        model,
        cache,
        batch_size=batch_size,
        device=str(model.device),
        dtype=model.dtype,
        progress=progress,
    )
    table, _ = read_embeddings(cache)
    rows = {
        (p, s, m): i
        for i, (p, s, m) in enumerate(
            zip(
                table.column("path").to_pylist(),
                table.column("size").to_pylist(),
                table.column("mtime_ns").to_pylist(),
            )
        )
    }
    failed = read_rejects(rejects_path(cache))
    keep, take = [], []
    for e in data.examples:
        if e.item.key in rows:
            keep.append(e)
            take.append(rows[e.item.key])
        else:
            data.rejects.append(
                (
                    e.item.path,
                    failed[e.item.path].reason if e.item.path in failed else "not embedded",
                )
            )
    data.examples = keep
    emb = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return emb.reshape(table.num_rows, -1)[take].astype(np.float32)


def _mels(data: Data, model: Model, progress: bool) -> list[torch.Tensor]:
    """The dB log-mel (64, T) of every example (in memory); failures move to ``data.rejects``."""
    keep, mels = [], []
    by_item = {e.item: e for e in data.examples}
    for item, samples, reason in inputs.load_all(
        [e.item for e in data.examples], progress=progress
    ):
        if samples is None:
            data.rejects.append((item.path, reason))
        else:
            keep.append(by_item[item])
            mels.append(model.mel(samples))
    data.examples = keep
    return mels


def _data_digest(data: Data) -> str:
    digest = hashlib.sha256()
    for e in data.examples:
        digest.update(f"{e.item.path}\t{e.item.size}\t{';'.join(e.labels)}\t{e.split}\n".encode())
    return digest.hexdigest()


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic.write_bytes(path, buf.getvalue().encode("utf-8"))


def _fmt(v) -> str | int:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.6g}" if isinstance(v, float) else v


# -- what the run writes -----------------------------------------------------------------------


def _num(v: float | None) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _write_classifier(
    out: Path,
    net: nn.Module,
    mode: str,
    labels: list[str],
    multilabel: bool,
    enc: Model,
    s: Setup,
    best_epoch: int,
    split: dict,
    stamp: dict,
) -> None:
    head = net if isinstance(net, Head) else net.head
    training = {**asdict(s), **split, "best_epoch": best_epoch}
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
        "multilabel": multilabel,
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


def _write_metrics(
    out: Path,
    res: Result,
    folds: list[dict],
    y: np.ndarray,
    pooled: np.ndarray,
    labels: list[str],
    multilabel: bool,
    stamp: dict,
) -> None:
    from dasheng_pipeline.common.figures import plt, save_png

    rows, plot = _per_class(y, pooled, labels, multilabel)
    header = (
        ["label", "examples", "scored_positives", "ap"]
        if multilabel
        else ["label", "examples", "scored", "precision", "recall", "f1"]
    )
    _write_csv(out / "per_class.csv", header, rows)
    atomic.write_json(
        out / "metrics.json",
        {
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
            "folds": [
                {
                    **f,
                    "test": None
                    if f["test"] is None
                    else {k: _num(v) for k, v in f["test"].items()},
                }
                for f in folds
            ],
            "provenance": stamp,
        },
    )
    n = len(labels)
    if multilabel:
        fig, ax = plt.subplots(figsize=(6, 1.5 + 0.25 * n))
        ax.barh(range(n), [0 if math.isnan(a) else a for a in plot["ap"]], color="tab:blue")
        ax.set_yticks(range(n), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("average precision (test)")
        ax.set_title(
            f"Per-class AP, mAP {res.test:.3f}" if res.test is not None else "Per-class AP"
        )
        save_png(fig, out / "per_class_ap.png", stamp)
        return
    cm = plot["confusion"]
    size = 2.5 + 0.22 * n
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        for i, j in zip(*np.nonzero(cm)):
            ax.text(
                j,
                i,
                int(cm[i, j]),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if cm[i, j] > cm.max() / 2 else "black",
            )
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    title = "Confusion matrix (test" + (", out-of-fold" if len(folds) > 1 else "") + ")"
    ax.set_title(title + (f", accuracy {res.test:.3f}" if res.test is not None else ""))
    save_png(fig, out / "confusion.png", stamp)


def _write_curve(out: Path, curve: list[dict], metric: str, stamp: dict) -> None:
    from dasheng_pipeline.common.figures import plt, save_png

    _write_csv(
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
) -> Result:
    """Train a classifier on DATA with ``model`` and write it with its metrics into ``out``; see
    the module docstring."""
    t0 = time.perf_counter()
    epochs = DEFAULTS["epochs"].get(mode, 1) if epochs is None else epochs
    lr = DEFAULTS["lr"].get(mode, 1e-3) if lr is None else lr
    _check_args(
        mode, folds, valid_fraction, test_fraction, epochs, lr, layer_decay, mixup, batch_size
    )
    out = Path(out)
    ds = read_data(data)
    for what, reason in ds.rejects:
        log.warning(f"skipped {what}: {reason}")
    out.mkdir(parents=True, exist_ok=True)
    enc = model if isinstance(model, Model) else Model.load(model, device, dtype)
    log.info(
        f"{data}: {len(ds.examples)} files, {len(ds.labels)} classes ({'multi' if ds.multilabel else 'single'}-label); "
        f"model {enc.spec} ({enc.dim}-d, sha256 {enc.sha256[:12]}…); mode {mode}"
    )
    features = (
        _frozen_features(ds, enc, out, batch_size, progress)
        if mode in FROZEN
        else _mels(ds, enc, progress)
    )
    if not ds.examples:
        raise FinetuneError(f"DATA {data}: no file could be used; see {out / 'rejects.csv'}")
    _write_csv(out / "rejects.csv", ["item", "reason"], [list(r) for r in ds.rejects])
    y = _targets(ds.examples, ds.labels)
    keys = [e.labels[0] for e in ds.examples]
    if {e.split for e in ds.examples} != {None}:
        if folds:
            log.warning(f"--folds {folds} ignored: {data} gives the splits")
        assignments = [np.array([e.split for e in ds.examples], dtype=object)]
    elif folds:
        assignments = split_folds(keys, folds, seed, stratify=not ds.multilabel)
    else:
        assignments = [
            split_once(keys, valid_fraction, test_fraction, seed, stratify=not ds.multilabel)
        ]
    setup = Setup(mode, ds.multilabel, epochs, lr, layer_decay, mixup, seed, batch_size)

    pooled = np.full(y.shape, np.nan, np.float32)  # out-of-fold test scores
    fold_results, saved = [], None
    for k, assign in enumerate(assignments):
        counts = {s: int((assign == s).sum()) for s in SPLITS}
        if counts["train"] == 0:
            raise FinetuneError(f"DATA {data}: no training examples in this split ({counts})")
        if mode in FROZEN:
            net, fit = train_frozen(features, y, assign, setup)
            test_logits = _head_logits(net, torch.from_numpy(features[assign == "test"]))
        else:
            net, fit = train_full(enc, features, y, assign, setup, progress)
            tuned = Model(enc.spec, net.encoder, enc.sha256, enc.device, enc.dtype)
            test_logits = _full_logits(
                net, tuned, [features[i] for i in np.flatnonzero(assign == "test")], batch_size
            )
        test = assign == "test"
        result = {
            "fold": k,
            "counts": counts,
            "best_epoch": fit.best_epoch,
            "epochs_run": len(fit.curve),
            "test": None,
        }
        if test.any():
            p = scores(test_logits, ds.multilabel).numpy()
            pooled[test] = p
            result["test"] = {
                "loss": float(_loss(test_logits, torch.from_numpy(y[test]), ds.multilabel)),
                "metric": _metric(y[test], p, ds.multilabel),
            }
        fold_results.append(result)
        if k == 0:
            saved = (net, fit)
        log.info(
            f"fold {k}: {counts}; best epoch {fit.best_epoch}; "
            f"test {'-' if result['test'] is None else round(result['test']['metric'], 4)}"
        )
    if not np.isfinite(pooled).any():
        log.warning(
            "no test split: metrics.json has no test scores (give test rows, or --test-fraction > 0)"
        )

    net, fit = saved
    test_fold = (
        {i: k for k, a in enumerate(assignments) for i in np.flatnonzero(a == "test")}
        if folds
        else None
    )
    _write_csv(
        out / "splits.csv",
        ["path", "label", "split"] + (["test_fold"] if test_fold is not None else []),
        [
            [e.item.path, ";".join(e.labels), assignments[0][i]]
            + ([test_fold.get(i, "")] if test_fold is not None else [])
            for i, e in enumerate(ds.examples)
        ],
    )
    section = {
        "data": {"source": str(data), "examples": len(ds.examples), "sha256": _data_digest(ds)},
        "model": enc.spec,
        "model_sha256": enc.sha256,
        "mode": mode,
        "folds": folds,
        "valid_fraction": valid_fraction,
        "test_fraction": test_fraction,
        "training": asdict(setup),
    }
    stamp = provenance.stamp(section, seed, audio.versions())
    metric_name = "mAP" if ds.multilabel else "accuracy"
    tests = [r["test"]["metric"] for r in fold_results if r["test"] is not None]
    test_mean = float(np.nanmean(tests)) if tests and not np.isnan(tests).all() else None
    test_std = float(np.nanstd(tests)) if len(tests) > 1 and test_mean is not None else None
    scored = np.isfinite(pooled).all(axis=1)
    chance = (
        (float(y[scored].mean(0)[y[scored].any(0)].mean()) if scored.any() else float("nan"))
        if ds.multilabel
        else 1.0 / len(ds.labels)
    )
    res = Result(
        str(out),
        mode,
        metric_name,
        test_mean,
        test_std,
        chance,
        len(ds.labels),
        len(ds.examples),
        len(ds.rejects),
        fit.best_epoch,
    )

    _write_classifier(
        out,
        net,
        mode,
        ds.labels,
        ds.multilabel,
        enc,
        setup,
        fit.best_epoch,
        {"valid_fraction": valid_fraction, "test_fraction": test_fraction, "folds": folds},
        stamp,
    )
    _write_metrics(out, res, fold_results, y, pooled, ds.labels, ds.multilabel, stamp)
    _write_curve(out, fit.curve, metric_name, stamp)
    res.seconds = time.perf_counter() - t0
    log.info(res.line())
    return res
