"""The trainers: a head on frozen clip embeddings (``linear``, ``mlp``) and the encoder with a
linear head (``full``), sharing one loop that keeps the best validation epoch."""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dasheng_model.encoder import MAX_TOKENS, DashengEncoder
from dasheng_model.inputs import FRAMES_PER_TOKEN
from dasheng_pipeline.evaluation import metrics
from dasheng_pipeline.tools.classifier import Head, build_head, head_config
from dasheng_pipeline.tools.classifier import probabilities as scores
from dasheng_pipeline.tools.embed import Model, autocast

HEAD_BATCH = 256  # frozen modes: embeddings per step
PATIENCE = 20  # frozen modes: epochs without a better validation score before stopping
PROBE_EPOCHS, PROBE_LR = 100, 1e-3  # full mode: the linear probe that initialises the head
WEIGHT_DECAY = 0.05  # full mode
CROP_FRAMES = MAX_TOKENS * FRAMES_PER_TOKEN  # 1008 mel frames: 10.08 s, the longest training crop
FREQ_MASK_BINS = 8
TIME_MASK_FRACTION = 0.2


def compute_loss(logits: torch.Tensor, target: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """target: (B, C) multi-hot, or soft (mixup) rows summing to 1."""
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, target)
    return F.cross_entropy(logits, target)


def score_metric(y: np.ndarray, p: np.ndarray, multilabel: bool) -> float:
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

    @property
    def validated(self) -> bool:
        return any(r["valid_metric"] is not None for r in self.curve)

    @property
    def best_is_last(self) -> bool:
        """The validation score picked the last epoch run: more epochs might still help."""
        return self.validated and self.best_epoch == len(self.curve)


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


def head_logits(head: Head, x: torch.Tensor) -> torch.Tensor:
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
            loss = compute_loss(head(xt[idx]), yt[idx], s.multilabel)
            loss.backward()
            opt.step()
            total, count = total + loss.item() * len(idx), count + len(idx)
        return total / max(count, 1)

    def evaluate():
        if not len(xv):
            return None
        logits = head_logits(head, xv)
        return float(compute_loss(logits, yv, s.multilabel)), score_metric(
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


def _probe_head(
    tuned: Model, mels: list[torch.Tensor], y: np.ndarray, assign: np.ndarray, s: Setup
) -> Head:
    """LP-FT: a linear probe on the pre-trained encoder's clip embeddings of the non-test clips
    (with their standardisation, fixed afterwards), so that the encoder's first steps follow a
    useful head."""
    probe_idx = np.flatnonzero(assign != "test")
    x0 = np.zeros((len(mels), tuned.dim), np.float32)
    x0[probe_idx] = clip_embeddings(tuned, [mels[i] for i in probe_idx], s.batch_size).cpu().numpy()
    probe_setup = Setup(
        "linear", s.multilabel, PROBE_EPOCHS, PROBE_LR, s.layer_decay, 0.0, s.seed, s.batch_size
    )
    probe, _ = train_frozen(x0, y, assign, probe_setup)
    return probe


def warmup_cosine(opt: torch.optim.Optimizer, epochs: int, steps_per_epoch: int):
    """One warm-up epoch (linear), then a cosine decay to 0 over the remaining steps."""
    total, warmup = epochs * steps_per_epoch, steps_per_epoch

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(opt, schedule)


@dataclass
class _FullRun:
    """One full fine-tune's state between its steps: the network, the data and the randomness."""

    net: FineTuner
    tuned: Model  # the encoder being trained, as a Model (evaluation embeds with it)
    mels: list[torch.Tensor]
    y: np.ndarray
    assign: np.ndarray
    s: Setup
    gen: torch.Generator  # crops, masks' batch order and mixup pairs
    rng: np.random.Generator  # mixup weights

    def __post_init__(self) -> None:
        self.yt = torch.from_numpy(self.y)
        self.train_idx = np.flatnonzero(self.assign == "train")
        self.valid_idx = np.flatnonzero(self.assign == "valid")

    def start(self, progress: bool) -> None:
        """The optimiser (AdamW, layer-wise lr decay), its schedule and the progress bar."""
        from tqdm import tqdm

        s = self.s
        self.opt = torch.optim.AdamW(
            layer_decay_groups(self.net.encoder, self.net.head, s.lr, s.layer_decay)
        )
        steps_per_epoch = max(1, math.ceil(len(self.train_idx) / s.batch_size))
        self.sched = warmup_cosine(self.opt, s.epochs, steps_per_epoch)
        self.bar = tqdm(
            total=s.epochs * steps_per_epoch,
            unit="step",
            desc="fine-tune",
            disable=not progress,
            file=sys.stderr,
            mininterval=2,
        )

    def batch_loss(self, idx: np.ndarray) -> torch.Tensor:
        """Random crops, SpecAugment masks and (optional) mixup of the clips ``idx`` → their loss."""
        s, device = self.s, self.tuned.device
        mel, valid = _crop_batch([self.mels[i] for i in idx], self.gen)
        mel = spec_augment(mel)
        target = self.yt[idx]
        if s.mixup > 0 and len(idx) > 1:
            lam = float(self.rng.beta(s.mixup, s.mixup))
            perm = torch.randperm(len(idx), generator=self.gen)
            mel = lam * mel + (1 - lam) * mel[perm]
            valid = torch.maximum(valid, valid[perm])
            target = lam * target + (1 - lam) * target[perm]
        with autocast(device, self.tuned.dtype):
            logits = self.net(mel.to(device), valid.to(device))
        return compute_loss(logits.float(), target.to(device), s.multilabel)

    def run_epoch(self, epoch: int) -> float:
        self.net.train()
        self.net.encoder.init_bn.eval()  # keep the pre-trained mel statistics
        order = self.train_idx[torch.randperm(len(self.train_idx), generator=self.gen).numpy()]
        loss_sum, count = 0.0, 0
        for b in range(0, len(order), self.s.batch_size):
            idx = order[b : b + self.s.batch_size]
            loss = self.batch_loss(idx)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
            loss_sum, count = loss_sum + loss.item() * len(idx), count + len(idx)
            self.bar.update(1)
        return loss_sum / max(count, 1)

    def evaluate(self) -> tuple[float, float] | None:
        if not len(self.valid_idx):
            return None
        mels = [self.mels[i] for i in self.valid_idx]
        logits = full_logits(self.net, self.tuned, mels, self.s.batch_size)
        multilabel = self.s.multilabel
        return (
            float(compute_loss(logits, self.yt[self.valid_idx], multilabel)),
            score_metric(self.y[self.valid_idx], scores(logits, multilabel).numpy(), multilabel),
        )


def train_full(
    model: Model,
    mels: list[torch.Tensor],
    y: np.ndarray,
    assign: np.ndarray,
    s: Setup,
    progress: bool,
) -> tuple[FineTuner, Fit]:
    """The encoder and a linear head trained on the training clips' log-mels."""
    torch.manual_seed(s.seed)
    gen = torch.Generator().manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    encoder = copy.deepcopy(model.encoder).to(model.device)
    head = build_head(head_config("full", encoder.embed_dim, y.shape[1]))
    net = FineTuner(encoder, head).to(model.device)
    tuned = Model(model.spec, encoder, model.sha256, model.device, model.dtype)
    net.head.load_state_dict(_probe_head(tuned, mels, y, assign, s).state_dict())
    run = _FullRun(net, tuned, mels, y, assign, s, gen, rng)
    run.start(progress)
    fit = _fit(s.epochs, run.run_epoch, run.evaluate, net, None)
    run.bar.close()
    net.eval()
    return net, fit


def full_logits(
    net: FineTuner, tuned: Model, mels: list[torch.Tensor], batch_size: int
) -> torch.Tensor:
    net.eval()
    with torch.no_grad():
        return net.head(clip_embeddings(tuned, mels, batch_size).to(tuned.device)).float().cpu()
