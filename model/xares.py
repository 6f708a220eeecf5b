"""Our Dasheng encoder behind X-ARES's encoder contract, so that X-ARES itself can evaluate the
project's checkpoints (``python -m xares.run model/xares.py <tasks>`` from the repository root).

X-ARES's checker (``xares.audio_encoder_checker.check_audio_encoder``) wants an ``nn.Module`` whose
class name ends in ``Encoder``, with ``output_dim``, ``sampling_rate`` and ``hop_size_in_ms``, and a
``forward`` taking a (B, samples) float tensor to (B, T, D), D = ``output_dim``. X-ARES builds the
class with no arguments (it looks up the one name ending in ``Encoder`` in this module), so the
checkpoint comes from the ``DASHENG_CHECKPOINT`` environment variable when none is passed: our
``.safetensors`` or an official ``.pt`` release; unset, it is a random-init ``base`` encoder (seed 0).

Long inputs (X-ARES sends whole clips, up to 10 minutes) are cut inside: the log-mel of the whole
input is computed once, then cut into windows of 1008 mel frames (252 tokens, 10.08 s), exactly the
chunks the encoder attends within, which go through the encoder ``batch_size`` at a time
(``dasheng_model.windows``, the batcher every embedding path of the project uses). Memory stays
bounded and the frames equal one call of the encoder on the whole input.
This module imports nothing but torch and ``model``; it never imports xares.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from dasheng_model import checkpoint as _checkpoint
from dasheng_model import hear as _hear
from dasheng_model.frontend import SAMPLE_RATE
from dasheng_model.inputs import SAMPLES_PER_TOKEN

CHECKPOINT_ENV = "DASHENG_CHECKPOINT"


class XaresDashengEncoder(nn.Module):
    """A Dasheng encoder as X-ARES wants it: waveform (B, S) at 16 kHz → frames (B, T, D) at 25 Hz."""

    sampling_rate = SAMPLE_RATE
    hop_size_in_ms = 1000 * SAMPLES_PER_TOKEN // SAMPLE_RATE  # 40 ms

    def __init__(
        self,
        checkpoint: str | os.PathLike | nn.Module | None = None,
        size: str = "base",
        batch_size: int = 8,
    ):
        super().__init__()
        self.batch_size = batch_size  # 10.08 s windows per forward pass
        if checkpoint is None:
            checkpoint = os.environ.get(CHECKPOINT_ENV) or None
        if isinstance(checkpoint, nn.Module):
            self.model = checkpoint
        elif checkpoint is None:
            self.model = _hear.random_encoder(size)
        else:
            self.model = _checkpoint.load_encoder(checkpoint)
        self.model.eval()
        self.output_dim = int(self.model.embed_dim)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """(B, S) float32 ((S,) and (B, 1, S) accepted) → (B, T = (S // 160 + 1) // 4, D)."""
        self.model.eval()
        return _hear.embed_sounds(self.model, audio, self.batch_size)[0]
