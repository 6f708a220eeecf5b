"""Waveform → dB log-mel, and the learned per-mel-bin normalisation (``init_bn``).

The front end is Dasheng's: torchaudio ``MelSpectrogram`` (16 kHz, n_fft 512, window 512,
hop 160, 64 HTK mel bins from 0 to 8 kHz, centred frames, power 2), then decibels
(10·log10, floor 1e-10) with everything more than 120 dB below the clip's own peak raised
to that level. The 120 dB clamp is computed PER CLIP: torchaudio's ``AmplitudeToDB`` on a
(B, F, T) batch would use the peak of the whole batch, so that one clip's features would
depend on its batch mates.

Module and buffer names follow the released checkpoints: ``front_end.0.spectrogram.window``,
``front_end.0.mel_scale.fb`` and ``init_bn.1.*``.
"""

from __future__ import annotations

import torch
import torchaudio
from torch import nn

SAMPLE_RATE = 16000
N_FFT = 512
WIN_LENGTH = 512
HOP_LENGTH = 160  # 10 ms frames, 100 Hz
N_MELS = 64
F_MIN = 0.0
F_MAX = 8000.0
TOP_DB = 120.0
AMIN = 1e-10  # power floor before log10 (torchaudio's default)

# The front end's parameters, the only copy: the feature stage computes its shards with this
# module's LogMel and records these in every shard, and training accepts only shards made with them.
MEL_PARAMS = {
    "sample_rate": SAMPLE_RATE,
    "n_fft": N_FFT,
    "win_length": WIN_LENGTH,
    "hop_length": HOP_LENGTH,
    "n_mels": N_MELS,
    "f_min": F_MIN,
    "f_max": F_MAX,
    "top_db": TOP_DB,
}


class PerClipDecibels(nn.Module):
    """Power mel (B, F, T) → dB, clamped at each clip's own peak minus ``top_db``."""

    def __init__(self, top_db: float = TOP_DB):
        super().__init__()
        self.top_db = top_db

    def forward(self, power: torch.Tensor) -> torch.Tensor:
        if power.requires_grad:  # out of place, so that autograd keeps what it needs
            db = 10.0 * torch.log10(power.clamp(min=AMIN))  # (B, F, T)
            floor = db.amax(dim=(-2, -1), keepdim=True) - self.top_db  # (B, 1, 1): per clip
            return torch.maximum(db, floor)
        db = power.clamp(min=AMIN).log10_().mul_(10.0)  # the same operations, in one buffer
        floor = db.amax(dim=(-2, -1), keepdim=True).sub_(self.top_db)
        return torch.maximum(db, floor, out=db)

    def extra_repr(self) -> str:
        return f"top_db={self.top_db}, per clip"


class LogMel(nn.Sequential):
    """Waveform (B, S) at 16 kHz → dB log-mel (B, 64, S // 160 + 1), always in float32.

    Runs with autocast disabled: in bf16/fp16 the power spectrum under- and overflows.
    """

    def __init__(self):
        # torchaudio cannot build its filterbank on the meta device (used to count parameters
        # without allocating): the two small buffers are then made on the CPU.
        device = torch.get_default_device()
        with torch.device("cpu" if device.type == "meta" else device):
            mel = torchaudio.transforms.MelSpectrogram(
                sample_rate=SAMPLE_RATE,
                n_fft=N_FFT,
                win_length=WIN_LENGTH,
                hop_length=HOP_LENGTH,
                f_min=F_MIN,
                f_max=F_MAX,
                n_mels=N_MELS,
                center=True,
            )
        super().__init__(mel, PerClipDecibels(TOP_DB))

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=wav.device.type, enabled=False):
            return super().forward(wav.float())


class MelBatchNorm(nn.Sequential):
    """Learned per-mel-bin normalisation ("init_bn"): dB log-mel (B, 64, T) → (B, 64, T).

    A ``BatchNorm2d(64, momentum=0.01)`` whose channels are the mel bins, at index 1 so that
    the released keys ``init_bn.1.*`` load unchanged. In training mode, ``valid_frames``
    (B,) keeps padding frames out of the batch statistics.
    """

    def __init__(self, n_mels: int = N_MELS):
        super().__init__(
            nn.Unflatten(1, (n_mels, 1)),  # (B, 64, T) -> (B, 64, 1, T)
            nn.BatchNorm2d(n_mels, momentum=0.01),
            nn.Flatten(1, 2),  # (B, 64, 1, T) -> (B, 64, T)
        )

    def forward(self, mel: torch.Tensor, valid_frames: torch.Tensor | None = None) -> torch.Tensor:
        bn: nn.BatchNorm2d = self[1]
        T = mel.shape[-1]
        if not self.training or valid_frames is None or bool((valid_frames >= T).all()):
            return super().forward(mel)
        # Batch statistics over the valid frames only.
        w = (torch.arange(T, device=mel.device) < valid_frames[:, None]).to(mel.dtype)[
            :, None, :
        ]  # (B, 1, T)
        n = w.sum()
        mean = (mel * w).sum(dim=(0, 2)) / n  # (64,)
        var = ((mel - mean[:, None]) ** 2 * w).sum(dim=(0, 2)) / n  # (64,), biased
        if bn.track_running_stats:
            with torch.no_grad():
                bn.running_mean.lerp_(mean, bn.momentum)
                bn.running_var.lerp_(var * n / (n - 1).clamp(min=1), bn.momentum)
                bn.num_batches_tracked += 1
        scale = bn.weight / torch.sqrt(var + bn.eps)  # (64,)
        return (mel - mean[:, None]) * scale[:, None] + bn.bias[:, None]
