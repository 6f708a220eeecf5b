"""The Dasheng encoder: dB log-mel → 64×4 patch tokens (25 Hz) → pre-norm ViT → LayerNorm.

Shapes: B batch, S samples, T mel frames (100 Hz), N tokens (T // 4), D embed dim.

- One token per 4 mel frames (40 ms): ``Conv2d(1, D, (64, 4), stride (64, 4))``.
- Learned absolute positions: ``time_pos_embed`` (1, D, 1, 252) and ``freq_pos_embed`` (1, D, 1, 1).
  252 tokens (1008 frames, 10.08 s) is the longest chunk the model sees at once; longer
  inputs are cut into chunks of 252 tokens that run independently (positions restart at 0,
  the last chunk is shorter) and are concatenated, as the official release does.
- Blocks: ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``; LayerNorm eps 1e-6, GELU, MLP ratio 4,
  attention through ``F.scaled_dot_product_attention`` with an optional key-padding mask.
- Padding: ``lengths`` in samples give ``length // 640`` valid tokens (the official rule),
  ``valid_frames`` give ``valid_frames // 4``. Padded tokens are never attended to; their
  own outputs are computed but meaningless.

Sizes (``SIZES``): ``base``, ``0.6B`` and ``1.2B`` are the released models. The released 0.6B
has embed dim 1280; the paper's Table 3 lists 1024 (MLP 4096), which does not match the
checkpoint, so this table follows the release so that its weights load.
``tiny`` is this project's own size for the demo and the tests (trains in minutes on 2 CPU cores).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dasheng_model.frontend import N_MELS, LogMel, MelBatchNorm
from dasheng_model.inputs import FRAMES_PER_TOKEN, SAMPLES_PER_TOKEN, check_mel, check_waveform

MAX_TOKENS = 252  # longest chunk: 1008 frames, 10.08 s
LN_EPS = 1e-6


@dataclass(frozen=True)
class EncoderConfig:
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0


SIZES: dict[str, EncoderConfig] = {
    "tiny": EncoderConfig(embed_dim=192, depth=6, num_heads=3),  # ours: demo and tests
    "base": EncoderConfig(embed_dim=768, depth=12, num_heads=12),  # dasheng_base, 85.4 M
    "0.6B": EncoderConfig(embed_dim=1280, depth=32, num_heads=16),  # dasheng_06B (paper: 1024)
    "1.2B": EncoderConfig(embed_dim=1536, depth=40, num_heads=24),  # dasheng_12B
}


def encoder_config(size: str | EncoderConfig) -> EncoderConfig:
    if isinstance(size, EncoderConfig):
        return size
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; expected one of {sorted(SIZES)}")
    return SIZES[size]


def size_name(config: EncoderConfig) -> str | None:
    """The name of ``config`` in ``SIZES``, or None for a custom size."""
    return next((name for name, c in SIZES.items() if c == config), None)


# CPU inference path: without gradients on CPU, in fp32 or under bf16 autocast, the Linear layers
# run oneDNN's linear on weights packed once for it (re-packed when a weight changes), fc1 fused with
# GELU. Faster than MKL's sgemm / autocast's per-call weight casts on AVX-512 CPUs (BENCHMARKS.md);
# fp32 outputs agree with F.linear to ~1e-6 (another summation order), bf16 ones compute what
# autocast computes (bf16 inputs and weights, fp32 accumulation, bf16 out). False: plain path always.
ONEDNN_INFERENCE = True


def _onednn_available() -> bool:
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_linear_pointwise")
        and hasattr(ops, "_reorder_linear_weight")
    )


_ONEDNN = _onednn_available()


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same keys) with the oneDNN CPU inference path above;
    ``forward(x, gelu=True)`` is ``F.gelu(linear(x))`` (erf GELU), fused on that path."""

    _packed: dict | None = None  # dtype -> ((weight storage, version), packed weight, bias)
    _released = False  # release_plain_weights: only the packed weights are left

    def train(self, mode: bool = True):
        if self._released and mode:
            raise RuntimeError(RELEASED)
        # Leaving training drops the packed weights: an optimiser may have changed the weights in
        # place without bumping their version (bitsandbytes' 8-bit AdamW writes through raw pointers),
        # so a validation after training steps must not trust the (pointer, version) key alone.
        if self.training and not mode:
            self._packed = None
        return super().train(mode)

    def __getstate__(self):  # copies and pickles leave the packed weights (opaque tensors) behind
        state = super().__getstate__()
        state.pop("_packed", None)
        return state

    def _onednn_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The precision of the oneDNN path for this call, or None for the plain path."""
        if not (
            ONEDNN_INFERENCE
            and _ONEDNN
            and x.device.type == "cpu"
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
        ):
            return None
        if torch.is_autocast_enabled("cpu"):
            return torch.bfloat16 if torch.get_autocast_dtype("cpu") == torch.bfloat16 else None
        return torch.float32 if x.dtype == self.weight.dtype == torch.float32 else None

    def _packed_for(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._released:
            entry = (self._packed or {}).get(dtype)
            if entry is None:
                raise RuntimeError(RELEASED)
            return entry[1], entry[2]
        # (an inference tensor, made under torch.inference_mode, has no version counter)
        version = None if self.weight.is_inference() else self.weight._version
        key = (self.weight.data_ptr(), version)
        if self._packed is None:
            self._packed = {}
        entry = self._packed.get(dtype)
        if entry is None or entry[0] != key:
            w = self.weight.detach().to(dtype)
            b = None if self.bias is None else self.bias.detach().to(dtype)
            entry = self._packed[dtype] = (key, torch.ops.mkldnn._reorder_linear_weight(w, None), b)
        return entry[1], entry[2]

    def forward(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        dtype = self._onednn_dtype(x)
        if dtype is not None:
            weight, bias = self._packed_for(dtype)
            return torch.ops.mkldnn._linear_pointwise(
                x.to(dtype), weight, bias, "gelu" if gelu else "none", [], "none" if gelu else ""
            )
        if self._released:
            raise RuntimeError(RELEASED)
        x = super().forward(x)
        return F.gelu(x) if gelu else x

    def release(self, dtype: torch.dtype) -> int:
        """Pack the weight for ``dtype`` and drop the plain one; the bytes freed."""
        with torch.no_grad():
            self._packed_for(dtype)
        freed = self.weight.nbytes
        self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)
        self._released = True
        return freed


RELEASED = (
    "this encoder keeps only its packed CPU inference weights (release_plain_weights): it runs "
    "on the CPU without gradients, in the precision it was packed for; load it again to train it"
)


def release_plain_weights(encoder: nn.Module, dtype: str = "fp32") -> int:
    """For inference on the CPU only (the command line's ``embed``): pack every Linear's weight
    for the oneDNN path in ``dtype`` ("fp32" or "bf16") and free the plain weights, so that the
    packed copy replaces them instead of doubling them (base: 343 MiB less). The encoder then runs
    only without gradients, on the CPU, in that precision, and cannot be trained or saved again.
    Returns the bytes freed (0 where the path is off or unavailable)."""
    if not (ONEDNN_INFERENCE and _ONEDNN):
        return 0
    packed = torch.bfloat16 if dtype == "bf16" else torch.float32
    return sum(
        m.release(packed)
        for m in encoder.modules()
        if isinstance(m, Linear) and not m._released and m.weight.device.type == "cpu"
    )


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = Linear(dim, dim * 3)
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, D/H)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, N, D/H)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x, gelu=True))  # fc1 then (erf) GELU


class Block(nn.Module):
    """Pre-norm transformer block; ``attn_mask`` (B, 1, 1, N) bool, True = may be attended to."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attn_mask)
        return x + self.mlp(self.norm2(x))


def key_padding_mask(valid: torch.Tensor | None) -> torch.Tensor | None:
    """(B, N) bool of real tokens → SDPA mask (B, 1, 1, N), or None when nothing is padded.

    A row with no real token at all (a chunk made only of padding) attends everywhere, so
    that its (ignored) outputs stay finite instead of NaN.
    """
    if valid is None or bool(valid.all()):
        return None
    valid = valid | ~valid.any(dim=1, keepdim=True)
    return valid[:, None, None, :]


class PatchEmbed(nn.Module):
    """dB log-mel (B, 64, T) → tokens (B, D, 1, T // 4): one per 4 frames, mel bins collapsed.

    The parameters are the release's ``Conv2d(1, D, (64, 4), stride (64, 4))``; as the kernel
    tiles the input without overlap, the convolution is computed as one matrix product over the
    flattened 64×4 patches (the same numbers up to summation order). oneDNN's direct convolution
    for one input channel is slow in bf16: 85 % of a bf16 inference pass on an AMX Xeon
    (BENCHMARKS.md, issue 17), against about 1 % as a product.
    """

    def __init__(self, embed_dim: int):
        super().__init__()
        kernel = (N_MELS, FRAMES_PER_TOKEN)
        self.proj = nn.Conv2d(1, embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        B, F_, T = mel.shape
        N = T // FRAMES_PER_TOKEN
        patches = (
            mel[..., : N * FRAMES_PER_TOKEN].reshape(B, F_, N, FRAMES_PER_TOKEN).transpose(1, 2)
        )
        weight = self.proj.weight.reshape(self.proj.out_channels, F_ * FRAMES_PER_TOKEN)  # (D, 256)
        x = F.linear(
            patches.reshape(B, N, F_ * FRAMES_PER_TOKEN), weight, self.proj.bias
        )  # (B, N, D)
        return x.transpose(1, 2)[:, :, None, :]  # (B, D, 1, N), as the convolution lays it out


class DashengEncoder(nn.Module):
    """Waveform or dB log-mel → frame embeddings (B, N, D) at 25 Hz (no pooling, no cls token)."""

    def __init__(self, config: EncoderConfig | str = "base"):
        super().__init__()
        self.config = config = encoder_config(config)
        D = config.embed_dim
        self.front_end = LogMel()  # (B, S) -> (B, 64, T), dB
        self.init_bn = MelBatchNorm()  # learned per-mel-bin normalisation
        self.patch_embed = PatchEmbed(D)
        self.time_pos_embed = nn.Parameter(torch.zeros(1, D, 1, MAX_TOKENS))
        self.freq_pos_embed = nn.Parameter(torch.zeros(1, D, 1, 1))
        self.blocks = nn.ModuleList(
            Block(D, config.num_heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(D, eps=LN_EPS)
        self.reset_parameters()

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def reset_parameters(self) -> None:
        nn.init.normal_(self.time_pos_embed, std=0.02)
        nn.init.normal_(self.freq_pos_embed, std=0.02)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear over the 64x4 patch
        nn.init.zeros_(self.patch_embed.proj.bias)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    # -- pieces the MAE reuses ------------------------------------------------------------

    def tokenize(self, mel: torch.Tensor, valid_frames: torch.Tensor | None = None) -> torch.Tensor:
        """dB log-mel (B, 64, T) → patch tokens (B, D, 1, N), before positions."""
        return self.patch_embed(self.init_bn(mel, valid_frames))

    def add_positions(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, D, 1, N ≤ 252) → (B, N, D) with time and frequency positions added."""
        x = x + self.time_pos_embed[..., : x.shape[-1]]
        x = x + self.freq_pos_embed
        return x.flatten(2).transpose(1, 2)

    def transformer(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Blocks and final norm: (B, N, D) → (B, N, D); ``valid`` (B, N) bool marks real tokens."""
        attn_mask = key_padding_mask(valid)
        x = x.contiguous()  # a token-major view of (B, D, N) would make every LayerNorm copy it
        for blk in self.blocks:
            x = blk(x, attn_mask)
        return self.norm(x)

    # -- inference -----------------------------------------------------------------------

    def encode(
        self, tokens: torch.Tensor, valid_tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Patch tokens (B, D, 1, N), any N → (B, N, D), in independent chunks of 252 tokens.

        Whole chunks are folded into the batch item by item, (B, k·252) → (B·k, 252), so
        one item's chunks never mix with another item's.
        """
        B, D, _, N = tokens.shape
        valid = None
        if valid_tokens is not None:
            valid = (
                torch.arange(N, device=tokens.device) < valid_tokens.to(tokens.device)[:, None]
            )  # (B, N)
        whole = N // MAX_TOKENS * MAX_TOKENS
        out = []
        if whole:
            k = whole // MAX_TOKENS
            x = (
                tokens[..., :whole].reshape(B, D, 1, k, MAX_TOKENS).permute(0, 3, 1, 2, 4)
            )  # (B, k, D, 1, 252)
            x = self.add_positions(x.reshape(B * k, D, 1, MAX_TOKENS))  # (B·k, 252, D)
            v = None if valid is None else valid[:, :whole].reshape(B * k, MAX_TOKENS)
            out.append(self.transformer(x, v).reshape(B, whole, D))
        if whole < N:
            x = self.add_positions(tokens[..., whole:])  # (B, N - whole, D)
            out.append(self.transformer(x, None if valid is None else valid[:, whole:]))
        return torch.cat(out, dim=1) if len(out) > 1 else out[0]

    def forward_mel(self, mel: torch.Tensor, valid_frames=None) -> torch.Tensor:
        """dB log-mel (B, 64, T) (float16/32, as the data stage stores it) → (B, T // 4, D).

        ``valid_frames`` (B,): frames of real audio per item; ``valid_frames // 4`` tokens count.
        """
        mel, valid_frames = check_mel(mel, valid_frames)
        mel = mel.to(self.time_pos_embed.device)
        valid_tokens = None if valid_frames is None else valid_frames // FRAMES_PER_TOKEN
        return self.encode(self.tokenize(mel, valid_frames), valid_tokens)

    def forward(self, wav: torch.Tensor, lengths=None) -> torch.Tensor:
        """Mono 16 kHz waveform (B, S) → (B, (S // 160 + 1) // 4, D).

        ``lengths`` (B,): samples of real audio per item; ``length // 640`` tokens count.
        """
        wav, lengths = check_waveform(wav, lengths)
        mel = self.front_end(wav.to(self.time_pos_embed.device))  # (B, 64, T)
        valid_tokens = None if lengths is None else lengths // SAMPLES_PER_TOKEN
        valid_frames = None if lengths is None else valid_tokens * FRAMES_PER_TOKEN
        return self.encode(self.tokenize(mel, valid_frames), valid_tokens)


def count_parameters(config: EncoderConfig | str) -> int:
    """Parameters of an encoder of this size, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = DashengEncoder(config)
    return sum(p.numel() for p in model.parameters())
