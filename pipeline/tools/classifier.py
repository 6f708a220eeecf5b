"""A classifier folder as ``finetune`` writes it and ``predict`` reads it.

- ``classifier.safetensors``: ``head.mean``, ``head.std`` (the standardisation of the clip
  embedding) and ``head.layers.*`` (one Linear, or HEAR's one-hidden-layer MLP); for ``full`` mode
  also the fine-tuned encoder, every key of its state dict under ``encoder.``.
- ``classifier.json``: ``labels`` (in output order), ``multilabel``, ``mode``, ``model`` (the
  encoder's spec and sha256 as ``Model`` gives them, and its config), ``head`` (the layers' shape),
  ``training`` (epochs, lr, … as run), ``weights_sha256`` and ``provenance``.

Nothing is unpickled: safetensors and JSON only. A frozen-mode classifier needs its encoder where
the spec names it (a checkpoint path is stored absolute), and refuses weights whose sha256 differs.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dasheng_model import pretrained
from dasheng_model.checkpoint import CheckpointError, load_state_dict_strict
from dasheng_model.encoder import DashengEncoder, EncoderConfig
from dasheng_model.inputs import check_dtype
from dasheng_pipeline.common import atomic
from dasheng_pipeline.evaluation.protocols.hear_mlp import HParams, build_mlp
from dasheng_pipeline.tools.embed import Model, resolve_device

WEIGHTS = "classifier.safetensors"
CONFIG = "classifier.json"
HIDDEN_DIM = 1024
DROPOUT = 0.1
FORMAT = 1


class Head(nn.Module):
    """Clip embedding (B, D) → logits (B, C): standardise with fixed statistics, then the layers
    (``hidden_layers`` 0: one Linear; 1: HEAR's MLP, Linear → BatchNorm → Dropout → ReLU → Linear)."""

    def __init__(
        self,
        in_dim: int,
        classes: int,
        hidden_layers: int = 0,
        hidden_dim: int = HIDDEN_DIM,
        dropout: float = DROPOUT,
    ):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.layers = build_mlp(
            in_dim, classes, HParams(hidden_layers, 0.0, "xavier_uniform"), hidden_dim, dropout
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers((x - self.mean) / self.std)  # (B, D) -> (B, C)


def head_config(mode: str, in_dim: int, classes: int) -> dict:
    return {
        "in_dim": in_dim,
        "classes": classes,
        "hidden_layers": 1 if mode == "mlp" else 0,
        "hidden_dim": HIDDEN_DIM,
        "dropout": DROPOUT,
    }


def build_head(cfg: dict) -> Head:
    return Head(
        cfg["in_dim"], cfg["classes"], cfg["hidden_layers"], cfg["hidden_dim"], cfg["dropout"]
    )


def probabilities(logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Logits → scores: sigmoid per label (multi-label) or softmax over labels."""
    return torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=-1)


def stored_spec(spec: str) -> str:
    """A spec as the classifier records it: a local path made absolute (predict may run elsewhere)."""
    path = Path(spec).expanduser()
    return (
        str(path.resolve())
        if not spec.startswith(pretrained.RANDOM_PREFIX) and path.exists()
        else spec
    )


def save(folder: Path, head: Head, encoder: DashengEncoder | None, meta: dict) -> None:
    """Write the weights, then the JSON (with the weights' sha256), each atomically."""
    tensors = {f"head.{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    if encoder is not None:
        tensors.update(
            {f"encoder.{k}": v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
        )
    weights = folder / WEIGHTS
    with atomic.atomic_path(weights) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "dasheng-pipeline classifier"})
    atomic.write_json(
        folder / CONFIG, {**meta, "format": FORMAT, "weights_sha256": atomic.sha256_file(weights)}
    )


def encoder_meta(model: Model) -> dict:
    return {
        "spec": stored_spec(model.spec),
        "sha256": model.sha256,
        "config": asdict(model.encoder.config),
    }


def _read_meta(folder: Path) -> dict:
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise CheckpointError(
            f"--classifier {folder}: expected a folder written by finetune ({CONFIG} and {WEIGHTS})"
        )
    try:
        meta = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
        missing = [k for k in ("labels", "mode", "model", "head") if k not in meta]
        if missing:
            raise KeyError(missing[0])
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{folder / CONFIG}: not a classifier description ({exc!r}); rerun finetune"
        ) from exc
    return meta


def _read_head(folder: Path, meta: dict) -> tuple[Head, dict[str, torch.Tensor]]:
    """The head with its weights, and every tensor of the weights file."""
    try:
        tensors = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"{folder / WEIGHTS}: corrupt safetensors file ({exc}); rerun finetune"
        ) from exc
    head_cfg = meta["head"]
    head = build_head(head_cfg)
    load_state_dict_strict(
        head,
        {k[5:]: v for k, v in tensors.items() if k.startswith("head.")},
        source=str(folder / WEIGHTS),
    )
    if len(meta["labels"]) != head_cfg["classes"]:
        raise CheckpointError(
            f"{folder / CONFIG}: {len(meta['labels'])} labels for a head of "
            f"{head_cfg['classes']} outputs"
        )
    return head, tensors


def _fine_tuned_encoder(
    folder: Path, meta: dict, tensors: dict[str, torch.Tensor], dev: torch.device, dtype: str
) -> Model:
    """Full mode: the encoder the classifier brings (``encoder.*``)."""
    encoder = DashengEncoder(EncoderConfig(**meta["model"]["config"]))
    load_state_dict_strict(
        encoder,
        {k[8:]: v for k, v in tensors.items() if k.startswith("encoder.")},
        source=str(folder / WEIGHTS),
    )
    spec = f"{folder} (fine-tuned {meta['model']['spec']})"
    return Model(spec, encoder.to(dev).eval(), meta.get("weights_sha256", ""), dev, dtype)


def _frozen_encoder(folder: Path, meta: dict, device: str, dtype: str) -> Model:
    """Frozen modes: the encoder where the spec names it, with the sha256 it was trained with."""
    spec, sha256 = meta["model"]["spec"], meta["model"]["sha256"]
    try:
        model = Model.load(spec, device, dtype)
    except CheckpointError as exc:
        raise CheckpointError(f"{folder}: its encoder {spec} cannot be loaded ({exc})") from exc
    if model.sha256 != sha256:
        raise CheckpointError(
            f"{folder}: trained on encoder weights with sha256 {sha256[:12]}…, "
            f"but {spec} now has {model.sha256[:12]}…; retrain, or restore them"
        )
    return model


def load(
    folder: str | os.PathLike, device: str = "cpu", dtype: str = "fp32"
) -> tuple[Model, Head, dict]:
    """A classifier folder → (the encoder to embed with, the head in eval mode, classifier.json)."""
    folder = Path(folder)
    meta = _read_meta(folder)
    head, tensors = _read_head(folder, meta)
    dev = resolve_device(device)
    if meta["mode"] == "full":
        model = _fine_tuned_encoder(folder, meta, tensors, dev, dtype)
    else:
        model = _frozen_encoder(folder, meta, device, dtype)
    check_dtype(dtype)
    return model, head.to(dev).eval(), meta
