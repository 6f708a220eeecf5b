"""Helpers shared by the model tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dasheng_model.encoder import Attention, DashengEncoder

SR = 16000


def noise(batch: int, seconds: float, seed: int = 0, scale: float = 0.1) -> torch.Tensor:
    """White noise (batch, seconds·16000), reproducible."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, int(round(seconds * SR)), generator=g) * scale


def trained_like(encoder: DashengEncoder, seed: int = 0) -> DashengEncoder:
    """Give init_bn non-trivial statistics (as a trained model has); returns it in eval mode."""
    g = torch.Generator().manual_seed(seed)
    bn = encoder.init_bn[1]
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(64, generator=g) * 5 - 40)
        bn.running_var.copy_(torch.rand(64, generator=g) * 200 + 50)
        bn.weight.copy_(1 + 0.1 * torch.randn(64, generator=g))
        bn.bias.copy_(0.1 * torch.randn(64, generator=g))
    return encoder.eval()


def explicit_attention(
    attn: Attention, x: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The textbook q·kᵀ → softmax → ·v computation with the same weights (a reference for SDPA)."""
    B, N, D = x.shape
    H = attn.num_heads
    q, k, v = attn.qkv(x).reshape(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-2, -1) / (D // H) ** 0.5
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    out = F.softmax(scores, dim=-1) @ v
    return attn.proj(out.transpose(1, 2).reshape(B, N, D))


def read_wav(path, start: int = 0, samples: int | None = None) -> torch.Tensor:
    """A 16 kHz mono 16-bit PCM file (the shared fixtures) as float32 in [-1, 1), shape (S,)."""
    import wave

    import numpy as np

    with wave.open(str(path), "rb") as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (SR, 1, 2), path
        w.setpos(start)
        data = w.readframes(w.getnframes() - start if samples is None else samples)
    return torch.from_numpy(np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0)
