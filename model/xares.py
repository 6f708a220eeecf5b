"""Our Dasheng encoder behind X-ARES's encoder contract, so that X-ARES itself can evaluate the
project's checkpoints (``python -m xares.run model/xares.py <tasks>`` from the repository root).

X-ARES's checker (``xares.audio_encoder_checker.check_audio_encoder``) wants an ``nn.Module`` whose
class name ends in ``Encoder``, with ``output_dim``, ``sampling_rate`` and ``hop_size_in_ms``, and a
``forward`` taking a (B, samples) float tensor to (B, T, D), D = ``output_dim``. X-ARES builds the
class with no arguments (it looks up the one name ending in ``Encoder`` in this module), so the
checkpoint comes from the ``DASHENG_CHECKPOINT`` environment variable when none is passed: our
``.safetensors`` or an official ``.pt`` release; unset, it is a random-init ``base`` encoder (seed 0).

Long inputs (X-ARES sends whole clips, up to 10 minutes) are chunked inside: the log-mel of the
whole input is computed once, then cut into pieces of 1008 mel frames (252 tokens, 10.08 s), which
are exactly the chunks the encoder attends within, and the pieces run through the transformer one at
a time. Memory stays bounded and the frames equal one call of the encoder on the whole input.
This module imports nothing but torch and ``model``; it never imports xares.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from dasheng_model import checkpoint as _checkpoint
from dasheng_model import hear as _hear
from dasheng_model.encoder import MAX_TOKENS
from dasheng_model.frontend import SAMPLE_RATE
from dasheng_model.inputs import FRAMES_PER_TOKEN, SAMPLES_PER_TOKEN, check_waveform

CHECKPOINT_ENV = "DASHENG_CHECKPOINT"
PIECE_FRAMES = (
    MAX_TOKENS * FRAMES_PER_TOKEN
)  # 1008 mel frames = 252 tokens = 10.08 s, the encoder's own chunk


class XaresDashengEncoder(nn.Module):
    """A Dasheng encoder as X-ARES wants it: waveform (B, S) at 16 kHz → frames (B, T, D) at 25 Hz."""

    sampling_rate = SAMPLE_RATE
    hop_size_in_ms = 1000 * SAMPLES_PER_TOKEN // SAMPLE_RATE  # 40 ms

    def __init__(self, checkpoint: str | os.PathLike | nn.Module | None = None, size: str = "base"):
        super().__init__()
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
        audio, _ = check_waveform(audio, None)  # (B, S) float32; (S,) and (B, 1, S) accepted
        self.model.eval()
        with torch.no_grad():
            mel = self.model.front_end(
                audio.to(self.model.time_pos_embed.device)
            )  # (B, 64, S // 160 + 1)
            usable = (
                mel.shape[-1] // FRAMES_PER_TOKEN * FRAMES_PER_TOKEN
            )  # frames that make whole tokens
            pieces = [
                self.model.forward_mel(mel[..., a : min(a + PIECE_FRAMES, usable)])  # (B, ≤ 252, D)
                for a in range(0, usable, PIECE_FRAMES)
            ]
        return torch.cat(pieces, dim=1)  # (B, T = (S // 160 + 1) // 4, D)
