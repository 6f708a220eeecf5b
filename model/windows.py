"""Audio of any length through the encoder: windows, a streaming log-mel and the batcher.

The encoder attends within chunks of 252 tokens (1008 mel frames, 10.08 s); a longer input is
cut into such chunks, which run independently. Every embedding path of the project (the command
line, the evaluation's embedding job, the fine-tune cache, the HEAR and X-ARES wrappers) cuts a
recording's log-mel into these windows itself (:func:`split_windows`) and runs them through one
:class:`WindowBatcher`, so a window gives the same frames whoever asks.

- :func:`split_windows`: a dB log-mel (64, T) → windows of ``WINDOW_FRAMES`` frames (the last
  shorter; a rest shorter than one token, < 4 frames, is dropped).
- :class:`StreamingLogMel`: the log-mel of a recording that arrives in blocks, window by window,
  in memory bounded by one window. Its numbers equal ``LogMel`` on the whole recording bit for
  bit: each window's STFT frames get exactly the samples (and, at both ends, the reflection
  padding) that the whole-file STFT gives them, and the 120 dB floor is taken from the
  recording's peak, which a first pass over the audio finds (:meth:`StreamingLogMel.peak`), so
  the audio is read twice.
- :class:`WindowBatcher`: windows from any number of recordings in, frame embeddings out, in
  batches. Windows of the same length (in mel frames) go together without padding: the same
  numbers, bit for bit, as the window alone (the encoder's results do not depend on unpadded
  batch mates). Only when more than ``pool`` windows of other lengths wait (a corpus of clips of
  many lengths) do the longest ``batch_size`` of them run together, padded to the longest and
  masked (padded tokens are never attended to and drop out of the sums): equal to the window
  alone within float rounding (about 1e-6); :meth:`WindowBatcher.flush` never pads. So a long
  recording (full windows and one shorter last window) gives the same bits as the encoder on the
  whole recording, and the order in which windows arrive decides the batches: the same inputs in
  the same order give the same bytes.
- :func:`embed_mels`: whole log-mels in memory → frames and clip embeddings per item.

A clip embedding is the mean of the item's frames: each window's frames are summed in float32
(as :func:`dasheng_model.embed.embed` sums them), the window sums added in float64 and divided by
the number of frames, then rounded to float32 (for a one-window item, exactly ``embed``'s mean).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator
from typing import NamedTuple

import numpy as np
import torch
import torchaudio

from dasheng_model.embed import Layer, _pool, _run, check_layer
from dasheng_model.encoder import MAX_TOKENS, DashengEncoder
from dasheng_model.frontend import AMIN, HOP_LENGTH, N_FFT, WIN_LENGTH, LogMel
from dasheng_model.inputs import FRAMES_PER_TOKEN, check_dtype

WINDOW_FRAMES = MAX_TOKENS * FRAMES_PER_TOKEN  # 1008 mel frames: 10.08 s, one pass of the encoder
WINDOW_SAMPLES = WINDOW_FRAMES * HOP_LENGTH  # 161 280 samples at 16 kHz


def split_windows(mel: torch.Tensor) -> list[torch.Tensor]:
    """dB log-mel (64, T) → windows (64, ≤ 1008); a rest of fewer than 4 frames is dropped."""
    return [p for p in mel.split(WINDOW_FRAMES, dim=1) if p.shape[1] >= FRAMES_PER_TOKEN]


def mel_frames(samples: int) -> int:
    """Mel frames of a recording of ``samples`` samples (centred frames): ``samples // 160 + 1``."""
    return samples // HOP_LENGTH + 1


# -- the streaming log-mel ---------------------------------------------------------------------


class StreamingLogMel:
    """``LogMel`` of a recording given as consecutive blocks of 16 kHz samples, one window at a time.

    Two passes over the same blocks: ``peak = s.peak(blocks)``, then ``for w in s.windows(blocks,
    peak)``: dB log-mel windows (64, ≤ 1008), equal to ``split_windows(LogMel()(whole))``.
    """

    def __init__(self, logmel: LogMel | None = None, window_frames: int = WINDOW_FRAMES):
        self.logmel = logmel if logmel is not None else LogMel()
        self.window_frames = window_frames
        spectrogram = self.logmel[0]
        self.window = spectrogram.spectrogram.window
        self.mel_scale = spectrogram.mel_scale
        self.top_db = self.logmel[1].top_db

    def _power(self, padded: torch.Tensor) -> torch.Tensor:
        """Already padded samples → power mel (64, frames) of the frames that fit."""
        spec = torchaudio.functional.spectrogram(
            padded, 0, self.window, N_FFT, HOP_LENGTH, WIN_LENGTH, 2.0, False, center=False
        )
        return self.mel_scale(spec)

    def power_windows(self, blocks: Iterable) -> Iterator[torch.Tensor]:
        """Blocks of samples → power mel windows (64, ≤ window_frames) of the whole recording."""
        pad, hop, W = N_FFT // 2, HOP_LENGTH, self.window_frames
        span = hop * (W - 1) + N_FFT  # padded samples that one window's frames cover
        parts: list[torch.Tensor] = []  # the padded signal (as torch.stft pads it), in pieces,
        have = 0  # from the next window's first frame on; the left reflection once known
        padded = False
        for block in blocks:
            x = torch.as_tensor(np.asarray(block, dtype=np.float32))
            parts.append(x)
            have += x.numel()
            if not padded and have > pad:
                x = torch.cat(parts)
                parts, have, padded = [x[1 : pad + 1].flip(0), x], have + pad, True
            if padded and have >= span:
                buf = torch.cat(parts)
                while buf.numel() >= span:
                    yield self._power(buf[:span])
                    buf = buf[hop * W :]
                parts, have = [buf], buf.numel()
        if not padded:  # shorter than the reflection: the whole recording at once
            if have:
                yield from self.logmel[0](torch.cat(parts)[None])[0].split(W, dim=1)
            return
        buf = torch.cat(parts)
        buf = torch.cat([buf, buf[-pad - 1 : -1].flip(0)])  # the right reflection
        while buf.numel() >= N_FFT:
            power = self._power(buf[:span])
            yield power
            buf = buf[hop * power.shape[1] :]

    def decibels(self, power: torch.Tensor) -> torch.Tensor:
        """Power mel → dB before the floor (``PerClipDecibels``' operations)."""
        return power.clamp(min=AMIN).log10_().mul_(10.0)

    def peak(self, blocks: Iterable) -> torch.Tensor:
        """The first pass: the recording's highest dB value (0-d float32)."""
        peak = torch.tensor(float("-inf"))
        for power in self.power_windows(blocks):
            peak = torch.maximum(peak, self.decibels(power).amax())
        return peak

    def windows(self, blocks: Iterable, peak: torch.Tensor) -> Iterator[torch.Tensor]:
        """The second pass: dB log-mel windows, floored at ``peak`` − 120 dB as ``LogMel`` does."""
        floor = peak.reshape(1, 1).sub(self.top_db)
        for power in self.power_windows(blocks):
            if power.shape[1] >= FRAMES_PER_TOKEN:
                yield torch.maximum(self.decibels(power), floor)


# -- the batcher -------------------------------------------------------------------------------


class Window(NamedTuple):
    """One window's result: the caller's key, its frames (n, D) float32 on the CPU (n = its mel
    frames // 4) and their float32 sum (D,)."""

    key: Hashable
    frames: torch.Tensor
    sum: torch.Tensor


class WindowBatcher:
    """Windows in (:meth:`add`), results out as their batches run; :meth:`flush` runs the rest.

    ``batch_size``: windows per forward pass; ``pool``: windows that may wait for a batch of their
    own length before the longest run together padded (default 4 × ``batch_size``; the evaluation
    uses ``batch_size - 1``: a batch of clips of different lengths runs padded, as HEAR's does).
    """

    def __init__(
        self,
        encoder: DashengEncoder,
        batch_size: int = 8,
        dtype="fp32",
        layer: Layer = "last",
        pool: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch size {batch_size}: expected at least 1")
        self.encoder = encoder
        self.batch_size = batch_size
        self.dtype = check_dtype(dtype)
        self.layer = check_layer(layer, len(encoder.blocks))
        self.pool = pool if pool is not None else 4 * batch_size
        self._waiting: dict[int, list[tuple[int, Hashable, torch.Tensor]]] = {}  # by mel frames
        self._count = 0  # windows added so far (their arrival order)
        self.batches = 0  # forward passes run

    @property
    def waiting(self) -> int:
        return sum(len(w) for w in self._waiting.values())

    def add(self, key: Hashable, mel: torch.Tensor) -> list[Window]:
        """Queue a dB log-mel window (64, 4 … 1008) under ``key``; returns the windows that ran."""
        if mel.ndim != 2 or not FRAMES_PER_TOKEN <= mel.shape[1] <= WINDOW_FRAMES:
            raise ValueError(
                f"window {key!r}: expected a log-mel (64, 4…{WINDOW_FRAMES}), got {tuple(mel.shape)}"
            )
        same = self._waiting.setdefault(mel.shape[1], [])
        same.append((self._count, key, mel))
        self._count += 1
        done = []
        if len(same) >= self.batch_size:
            done += self._run(same[: self.batch_size])
            del same[: self.batch_size]
        while self.waiting > self.pool:
            done += self._run(self._longest())
        return done

    def flush(self) -> list[Window]:
        """Run every waiting window, longest first, each length on its own (no padding)."""
        done = []
        for frames in sorted(self._waiting, reverse=True):
            same = self._waiting.pop(frames)
            for b in range(0, len(same), self.batch_size):
                done += self._run(same[b : b + self.batch_size])
        return done

    def _longest(self) -> list[tuple[int, Hashable, torch.Tensor]]:
        entries = sorted(
            (e for w in self._waiting.values() for e in w), key=lambda e: (-e[2].shape[1], e[0])
        )[: self.batch_size]
        taken = {e[0] for e in entries}
        for frames in list(self._waiting):
            self._waiting[frames] = [e for e in self._waiting[frames] if e[0] not in taken]
            if not self._waiting[frames]:
                del self._waiting[frames]
        return entries

    def _run(self, entries: list[tuple[int, Hashable, torch.Tensor]]) -> list[Window]:
        lengths = [e[2].shape[1] for e in entries]
        longest = max(lengths)
        if min(lengths) == longest:  # one length: no padding, no mask
            mel, valid = torch.stack([e[2] for e in entries]), None
        else:
            first = entries[0][2]
            mel = first.new_zeros(len(entries), first.shape[0], longest)
            for k, (_, _, m) in enumerate(entries):
                mel[k, :, : m.shape[1]] = m
            valid = torch.tensor(lengths)
        device = self.encoder.time_pos_embed.device
        frames = _run(self.encoder, "forward_mel", (mel.to(device), valid), self.dtype, self.layer)
        num = None if valid is None else valid // FRAMES_PER_TOKEN
        frames, sums, num = _pool(frames, num, sums=True)
        frames, sums = frames.cpu(), sums.cpu()
        self.batches += 1
        return [
            Window(key, frames[k, : int(num[k])].clone(), sums[k].clone())
            for k, (_, key, _) in enumerate(entries)
        ]


# -- whole items in memory ---------------------------------------------------------------------


class Pooled:
    """An item's windows put back together: frames in order, clip = mean of every frame."""

    def __init__(self, windows: int, dim: int):
        self.parts: list[torch.Tensor | None] = [None] * windows
        self.total = torch.zeros(dim, dtype=torch.float64)
        self.frames = 0

    def put(self, index: int, window: Window) -> None:
        self.parts[index] = window.frames
        self.total += window.sum.double()
        self.frames += window.frames.shape[0]

    @property
    def done(self) -> bool:
        return all(p is not None for p in self.parts)

    def clip(self) -> torch.Tensor:
        return clip_mean(self.total, self.frames)

    def all_frames(self, dim: int) -> torch.Tensor:
        return torch.cat(self.parts) if self.parts else torch.zeros(0, dim)


def clip_mean(total: torch.Tensor, frames: int) -> torch.Tensor:
    """float64 sum of ``frames`` frames → their mean as float32 (NaN for no frame)."""
    return (total / frames).float() if frames else torch.full_like(total, float("nan")).float()


def embed_mels(
    encoder: DashengEncoder,
    mels: Iterable[torch.Tensor],
    batch_size: int = 8,
    dtype="fp32",
    layer: Layer = "last",
    pool: int | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Whole dB log-mels (64, T_i) → per item (frames (T_i // 4, D), clip (D,)), float32 on the CPU,
    through a :class:`WindowBatcher` (the windows of all items batched together)."""
    batcher = WindowBatcher(encoder, batch_size, dtype, layer, pool)
    dim = encoder.embed_dim
    items: list[Pooled] = []
    for i, mel in enumerate(mels):
        windows = split_windows(mel)
        items.append(Pooled(len(windows), dim))
        for w, window in enumerate(windows):
            for done in batcher.add((i, w), window):
                items[done.key[0]].put(done.key[1], done)
    for done in batcher.flush():
        items[done.key[0]].put(done.key[1], done)
    return [(item.all_frames(dim), item.clip()) for item in items]
