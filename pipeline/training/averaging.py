"""The final encoder: the mean of the weights of the best checkpoints by validation loss
(the official recipe averages the 4 best)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

ENCODER_PREFIX = "encoder."


def average_state_dicts(state_dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean (in float64, cast back) of floating tensors; integer tensors (BatchNorm's
    ``num_batches_tracked``) are taken from the first checkpoint."""
    if not state_dicts:
        raise ValueError("no checkpoints to average")
    keys = list(state_dicts[0])
    for i, sd in enumerate(state_dicts[1:], start=1):
        if list(sd) != keys:
            raise ValueError(f"checkpoint {i} has different keys from checkpoint 0; cannot average")
    out = {}
    for key in keys:
        first = state_dicts[0][key]
        if first.is_floating_point():
            total = torch.zeros_like(first, dtype=torch.float64)
            for sd in state_dicts:
                total += sd[key].to(torch.float64)
            out[key] = (total / len(state_dicts)).to(first.dtype)
        else:
            out[key] = first.clone()
    return out


def encoder_state(mae_weights: str | Path) -> dict[str, torch.Tensor]:
    """The encoder's part of a saved MAE state dict (keys without the ``encoder.`` prefix)."""
    sd = load_file(str(mae_weights))
    return {k[len(ENCODER_PREFIX) :]: v for k, v in sd.items() if k.startswith(ENCODER_PREFIX)}
