"""Checks on what callers hand the model: each failure is a ``ValueError`` that says what was
expected. Returned tensors are float32 (audio, mel) and int64 (counts)."""

from __future__ import annotations

import torch

from dasheng_model.frontend import N_MELS, SAMPLE_RATE

SAMPLES_PER_TOKEN = 640  # 4 frames of 160 samples: one token every 40 ms (25 Hz)
FRAMES_PER_TOKEN = 4


def check_sample_rate(sample_rate: int) -> None:
    if sample_rate != SAMPLE_RATE:
        raise ValueError(
            f"expected audio at {SAMPLE_RATE} Hz, got {sample_rate} Hz: resample it first "
            "(the project decodes and resamples with ffmpeg, see dasheng_pipeline.common.audio)"
        )


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{what} contains {bad} NaN or infinite values; expected finite numbers")


def _check_counts(counts, batch: int, low: int, high: int, what: str, unit: str) -> torch.Tensor:
    counts = torch.as_tensor(counts)
    if counts.dtype.is_floating_point or counts.dtype == torch.bool:
        raise ValueError(f"{what} must be integers ({unit}), got dtype {counts.dtype}")
    if counts.shape != (batch,):
        raise ValueError(
            f"{what} must have shape ({batch},), one count per item, got {tuple(counts.shape)}"
        )
    counts = counts.long()
    if batch and (int(counts.min()) < low or int(counts.max()) > high):
        raise ValueError(
            f"{what} must lie in [{low}, {high}] {unit}, got values from "
            f"{int(counts.min())} to {int(counts.max())}"
        )
    return counts


def check_waveform(wav: torch.Tensor, lengths=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mono 16 kHz audio as (B, S), (S,) or (B, 1, S) → float32 (B, S); ``lengths`` (B,) in samples."""
    if not isinstance(wav, torch.Tensor):
        raise ValueError(
            f"expected audio as a torch.Tensor of shape (batch, samples), got {type(wav).__name__}"
        )
    if wav.ndim == 3 and wav.shape[1] == 1:
        wav = wav[:, 0]
    elif wav.ndim == 1:
        wav = wav[None]
    if wav.ndim == 3:
        raise ValueError(
            f"expected mono audio (batch, samples), got {wav.shape[1]} channels in shape "
            f"{tuple(wav.shape)}: downmix to mono first"
        )
    if wav.ndim != 2:
        raise ValueError(f"expected audio of shape (batch, samples), got shape {tuple(wav.shape)}")
    if not wav.dtype.is_floating_point:
        raise ValueError(f"expected float audio in [-1, 1], got dtype {wav.dtype}")
    batch, samples = wav.shape
    if batch == 0 or samples == 0:
        raise ValueError(
            f"empty audio: shape {tuple(wav.shape)}; expected at least one clip of >= "
            f"{SAMPLES_PER_TOKEN} samples"
        )
    if samples < SAMPLES_PER_TOKEN:
        hint = " (is it (samples, channels)? expected (batch, samples))" if batch > samples else ""
        raise ValueError(
            f"audio too short: {samples} samples; expected at least {SAMPLES_PER_TOKEN} samples "
            f"({1000 * SAMPLES_PER_TOKEN // SAMPLE_RATE} ms at {SAMPLE_RATE} Hz, one token){hint}"
        )
    wav = wav.float()
    _check_finite(wav, "audio")
    if lengths is not None:
        lengths = _check_counts(lengths, batch, SAMPLES_PER_TOKEN, samples, "lengths", "samples")
    return wav, lengths


def check_mel(mel: torch.Tensor, valid_frames=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dB log-mel (B, 64, T), float16/bfloat16/float32 → float32; ``valid_frames`` (B,)."""
    if not isinstance(mel, torch.Tensor):
        raise ValueError(
            f"expected a log-mel torch.Tensor of shape (batch, {N_MELS}, frames), "
            f"got {type(mel).__name__}"
        )
    if mel.ndim != 3 or mel.shape[1] != N_MELS:
        raise ValueError(
            f"expected a dB log-mel of shape (batch, {N_MELS}, frames), got shape {tuple(mel.shape)}"
        )
    if not mel.dtype.is_floating_point:
        raise ValueError(f"expected a floating-point log-mel, got dtype {mel.dtype}")
    batch, _, frames = mel.shape
    if batch == 0:
        raise ValueError(f"empty log-mel batch: shape {tuple(mel.shape)}")
    if frames < FRAMES_PER_TOKEN:
        raise ValueError(
            f"log-mel too short: {frames} frames; expected at least {FRAMES_PER_TOKEN} (one token)"
        )
    mel = mel.float()
    _check_finite(mel, "log-mel")
    if valid_frames is not None:
        valid_frames = _check_counts(
            valid_frames, batch, FRAMES_PER_TOKEN, frames, "valid_frames", "frames"
        )
    return mel, valid_frames


# Precision of a forward pass: "fp32" (no autocast) or "bf16" (bf16 autocast on the model's
# device, CPU or GPU; the front end and the pooling stay fp32, outputs are always float32).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16"}


def check_dtype(dtype) -> str:
    """``"fp32"``/``"bf16"`` (or ``"float32"``/``"bfloat16"``, ``torch.float32``/``torch.bfloat16``,
    None for fp32) → ``"fp32"`` or ``"bf16"``."""
    if dtype is None:
        return "fp32"
    if isinstance(dtype, torch.dtype):
        name = next((k for k, v in DTYPES.items() if v == dtype), None)
    else:
        name = _DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if name not in DTYPES:
        raise ValueError(
            f"unsupported dtype {dtype!r}: expected 'fp32' or 'bf16' (or torch.float32 / torch.bfloat16)"
        )
    return name
