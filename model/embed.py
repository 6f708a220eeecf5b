"""Frame (25 Hz) and clip embeddings from a Dasheng encoder, as the paper's downstream protocol
uses them: last layer, frames at 40 ms, clip = mean of the real frames.

``dtype``: ``"fp32"`` (default) or ``"bf16"`` (also ``torch.float32`` / ``torch.bfloat16``). bf16
runs the transformer under bf16 autocast on the encoder's device, CPU or GPU (about twice as fast on
a CPU with AVX512-BF16 or AMX); the front end runs in fp32 either way and the outputs are float32.

``layer`` picks the block the embeddings come from: ``"last"`` (the paper's protocol, the
encoder's output), ``N`` (1 … depth: block N's output through the encoder's final LayerNorm, so
``N = depth`` is ``"last"`` exactly and every layer has the same scale), or ``"mean"`` (the mean
of those over all blocks). ``embed_layers`` gives every block's at once, from one forward pass.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from dasheng_model.encoder import DashengEncoder
from dasheng_model.frontend import HOP_LENGTH, SAMPLE_RATE
from dasheng_model.inputs import (
    FRAMES_PER_TOKEN,
    SAMPLES_PER_TOKEN,
    check_dtype,
    check_mel,
    check_sample_rate,
    check_waveform,
)

FRAME_MS = 1000 * SAMPLES_PER_TOKEN / SAMPLE_RATE  # 40 ms between frame embeddings
# A frame embedding covers mel frames 4k..4k+3, centred at 10·(4k..4k+3) ms: its centre is 15 ms later.
FRAME_CENTRE_MS = 1000 * HOP_LENGTH * (FRAMES_PER_TOKEN - 1) / 2 / SAMPLE_RATE


Layer = str | int  # "last" | "mean" | 1 … depth


class Embeddings(NamedTuple):
    frames: torch.Tensor  # (B, T, D) float32 at 25 Hz; zeros at padding
    clip: torch.Tensor  # (B, D) mean of each item's real frames
    num_frames: torch.Tensor  # (B,) long: real frames per item


def frame_times_ms(num_frames: int) -> torch.Tensor:
    """Centre of each frame embedding in milliseconds, (num_frames,) float32."""
    return torch.arange(num_frames, dtype=torch.float32) * FRAME_MS + FRAME_CENTRE_MS


def _pool(frames: torch.Tensor, num_frames: torch.Tensor | None, sums: bool = False):
    """Padding frames zeroed, clip = the mean of the real ones → Embeddings; ``sums=True``:
    (frames, their float32 sums (B, D), num_frames) instead (the windows' batcher adds them up)."""
    B, T, _ = frames.shape
    if num_frames is None:
        num_frames = torch.full((B,), T, dtype=torch.long)
    real = torch.arange(T, device=frames.device) < num_frames.to(frames.device)[:, None]  # (B, T)
    frames = torch.where(real[..., None], frames.float(), 0.0)
    total = frames.sum(dim=1)
    if sums:
        return frames, total, num_frames.cpu()
    return Embeddings(frames, total / num_frames.to(frames.device)[:, None], num_frames.cpu())


# bf16 copies of each encoder's Linear/Conv2d weights, kept between calls (autocast would cast
# them again on every call: about 5 % of a base forward pass on CPU).
_BF16_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _bf16_weights(encoder: DashengEncoder) -> dict[str, torch.Tensor]:
    """The bf16 casts autocast makes of the weights of the matrix products (Linear, Conv2d), as
    ``"encoder.<name>"`` → tensor; recast when a parameter changes (its storage or version)."""
    params = {
        f"encoder.{m}.{n}": p
        for m, module in encoder.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d))
        for n, p in module.named_parameters(recurse=False)
    }
    key = tuple((p.data_ptr(), p._version, p.device) for p in params.values())
    cached = _BF16_WEIGHTS.get(encoder)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, {name: p.to(torch.bfloat16) for name, p in params.items()})
        _BF16_WEIGHTS[encoder] = cached
    return cached[1]


class _Call(nn.Module):
    """``encoder.<method>(*args)`` as a module's forward, for ``torch.func.functional_call``."""

    def __init__(self, encoder: DashengEncoder, method: str):
        super().__init__()
        self.encoder, self.method = encoder, method

    def forward(self, *args):
        return getattr(self.encoder, self.method)(*args)


def _run(encoder: DashengEncoder, method: str, args: tuple, dtype, layer: Layer = "last"):
    """``encoder.<method>(*args)`` in eval mode without gradients, in fp32 or under bf16 autocast
    (with the cached bf16 weights: the same numbers as plain autocast, without the casts); the
    output of ``layer`` (``"all"``: every block's, a list)."""
    bf16 = check_dtype(dtype) == "bf16"
    device_type = encoder.time_pos_embed.device.type

    def forward() -> torch.Tensor:
        if not bf16:
            return getattr(encoder, method)(*args)
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return torch.func.functional_call(_Call(encoder, method), _bf16_weights(encoder), args)

    was_training = encoder.training
    if (
        was_training
    ):  # weights may have changed in place without a version bump (see encoder.Linear.train)
        _BF16_WEIGHTS.pop(encoder, None)
    encoder.eval()
    try:
        with torch.no_grad():  # not inference_mode: its tensors could not feed a trained probe
            if layer == "all":
                return _block_frames(encoder, forward)
            return _layer_frames(encoder, forward, layer)
    finally:
        encoder.train(was_training)


def check_layer(layer: Layer, depth: int) -> Layer:
    """``"last"``, ``"mean"`` or a block number 1 … depth (an int or its digits); else ValueError."""
    if isinstance(layer, str) and layer.strip().lstrip("-").isdigit():
        layer = int(layer)
    if layer in ("last", "mean") or (
        isinstance(layer, int) and not isinstance(layer, bool) and 1 <= layer <= depth
    ):
        return layer
    raise ValueError(
        f"layer {layer!r}: expected 'last', 'mean' or a block number 1..{depth} (this encoder has {depth} blocks)"
    )


def _block_frames(
    encoder: DashengEncoder, forward: Callable[[], torch.Tensor]
) -> list[torch.Tensor]:
    """Run ``forward`` and return every block's output through the final norm, [(B, N, D)] × depth.

    Forward hooks on the blocks collect their outputs; an input longer than one chunk passes the
    blocks twice (its whole 252-token chunks folded into the batch, then the rest), and the
    pieces are put back in time order as ``encoder.encode`` does with its outputs.
    """
    calls: list[list[torch.Tensor]] = [[] for _ in encoder.blocks]
    hooks = [
        blk.register_forward_hook(lambda _m, _i, out, i=i: calls[i].append(out))
        for i, blk in enumerate(encoder.blocks)
    ]
    try:
        final = forward()  # (B, N, D)
    finally:
        for h in hooks:
            h.remove()
    B, _, D = final.shape
    return [
        encoder.norm(torch.cat([c.reshape(B, -1, D) for c in pieces], dim=1).float())
        for pieces in calls
    ]


def _layer_frames(
    encoder: DashengEncoder, forward: Callable[[], torch.Tensor], layer: Layer
) -> torch.Tensor:
    layer = check_layer(layer, len(encoder.blocks))
    if layer == "last":
        return forward()
    blocks = _block_frames(encoder, forward)
    return torch.stack(blocks).mean(0) if layer == "mean" else blocks[layer - 1]


def embed(
    encoder: DashengEncoder,
    audio: torch.Tensor,
    sample_rate: int = SAMPLE_RATE,
    lengths=None,
    dtype="fp32",
    layer: Layer = "last",
) -> Embeddings:
    """Mono audio (B, S) at 16 kHz → embeddings of ``layer``; ``lengths`` (B,) in samples for padded
    batches (an item then has ``length // 640`` real frames); ``dtype`` "fp32" or "bf16" (autocast)."""
    check_sample_rate(sample_rate)
    audio, lengths = check_waveform(audio, lengths)
    check_layer(layer, len(encoder.blocks))
    frames = _run(encoder, "forward", (audio, lengths), dtype, layer)
    return _pool(frames, None if lengths is None else lengths // SAMPLES_PER_TOKEN)


def embed_mel(
    encoder: DashengEncoder,
    mel: torch.Tensor,
    valid_frames=None,
    dtype="fp32",
    layer: Layer = "last",
) -> Embeddings:
    """dB log-mel (B, 64, T) as the data stage stores it → embeddings of ``layer``; ``valid_frames``
    (B,) mel frames of real audio (an item then has ``valid_frames // 4`` real frame embeddings);
    ``dtype`` "fp32" or "bf16" (autocast)."""
    mel, valid_frames = check_mel(mel, valid_frames)
    check_layer(layer, len(encoder.blocks))
    frames = _run(encoder, "forward_mel", (mel, valid_frames), dtype, layer)
    return _pool(frames, None if valid_frames is None else valid_frames // FRAMES_PER_TOKEN)


def embed_layers(
    encoder: DashengEncoder, mel: torch.Tensor, valid_frames=None, dtype="fp32"
) -> list[Embeddings]:
    """dB log-mel (B, 64, T) → the embeddings of every block, [block 1, …, block depth], from one
    forward pass (the last one equals ``embed_mel``'s)."""
    mel, valid_frames = check_mel(mel, valid_frames)
    blocks = _run(encoder, "forward_mel", (mel, valid_frames), dtype, "all")
    num = None if valid_frames is None else valid_frames // FRAMES_PER_TOKEN
    return [_pool(frames, num) for frames in blocks]
