"""Dasheng's masked autoencoder, in one module.

Shapes: B batch, T mel frames (≤ 1008), N tokens (T // 4 ≤ 252), N2 = N rounded up to even,
K visible tokens per item (padded to the batch's largest), D encoder dim, Dd decoder dim.

1. The dB log-mel (B, 64, T) is the target; ``init_bn`` + the 64×4 patch embedding + the
   time/frequency positions turn it into tokens (B, N, D).
2. Group masking: adjacent token pairs (80 ms) are kept or dropped together; 75 % of each item's
   pairs are dropped, chosen by sorting noise from a (seedable) ``torch.Generator``.
   Padding (beyond ``valid_frames``) is never visible and never in the loss.
3. The encoder runs on the visible tokens only.
4. The decoder projects them to Dd, puts a learned mask token at every hidden position, adds its
   own learned positions, runs its blocks and predicts the 256 = 64×4 dB values of every token.
5. Loss: MSE against each token's target normalised by its own mean and variance, averaged over
   masked real tokens only.

Decoders (``DECODERS``): Dec-25M (512/8/16) for base and 0.6B, Dec-56M (768/8/24) for 1.2B, and a
small one for ``tiny``. After training only the encoder (``mae.encoder``) is exported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from dasheng_model.encoder import (
    LN_EPS,
    MAX_TOKENS,
    Block,
    DashengEncoder,
    EncoderConfig,
    encoder_config,
)
from dasheng_model.frontend import N_MELS
from dasheng_model.inputs import FRAMES_PER_TOKEN, check_mel

PATCH_VALUES = N_MELS * FRAMES_PER_TOKEN  # 256 dB values per token
GROUP = 2  # tokens masked together


@dataclass(frozen=True)
class DecoderConfig:
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0


DECODERS: dict[str, DecoderConfig] = {
    "dec-tiny": DecoderConfig(embed_dim=128, depth=2, num_heads=4),
    "dec-25m": DecoderConfig(embed_dim=512, depth=8, num_heads=16),
    "dec-56m": DecoderConfig(embed_dim=768, depth=8, num_heads=24),
}
DEFAULT_DECODER = {"tiny": "dec-tiny", "base": "dec-25m", "0.6B": "dec-25m", "1.2B": "dec-56m"}


def decoder_config(name: str | DecoderConfig) -> DecoderConfig:
    if isinstance(name, DecoderConfig):
        return name
    if name not in DECODERS:
        raise ValueError(f"unknown decoder {name!r}; expected one of {sorted(DECODERS)}")
    return DECODERS[name]


def patchify(mel: torch.Tensor) -> torch.Tensor:
    """dB log-mel (B, 64, T) → targets (B, T // 4, 256), values ordered (mel bin, frame)."""
    B, F, T = mel.shape
    N = T // FRAMES_PER_TOKEN
    x = mel[..., : N * FRAMES_PER_TOKEN].reshape(B, F, N, FRAMES_PER_TOKEN)
    return x.permute(0, 2, 1, 3).reshape(B, N, F * FRAMES_PER_TOKEN)


class Masking(NamedTuple):
    keep: torch.Tensor  # (B, K) long: token indices fed to the encoder, pairs side by side
    keep_real: torch.Tensor  # (B, K) bool: the kept slot holds a real visible token
    restore: torch.Tensor  # (B, N2) long: where each token sits in [kept..., dropped...] order
    masked: torch.Tensor  # (B, N2) bool: real tokens hidden from the encoder (the loss's tokens)
    real: torch.Tensor  # (B, N2) bool: real (not padding) tokens


def group_masking(
    valid_tokens: torch.Tensor,
    num_tokens: int,
    mask_ratio: float = 0.75,
    generator: torch.Generator | None = None,
) -> Masking:
    """Choose the visible token pairs of each item.

    ``valid_tokens`` (B,): real tokens per item, the rest of ``num_tokens`` is padding. Each
    item keeps ``floor(pairs · (1 - mask_ratio))`` (at least 1) of its ``ceil(valid / 2)``
    pairs. The noise is drawn on the generator's device, so a seed gives the same masks on
    CPU and GPU.
    """
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must lie strictly between 0 and 1, got {mask_ratio}")
    device = valid_tokens.device
    B = valid_tokens.shape[0]
    G = -(-num_tokens // GROUP)  # pairs, the last one may hold a padding token
    pairs = -(-valid_tokens // GROUP)  # (B,) real pairs
    kept_pairs = torch.floor(pairs * (1.0 - mask_ratio) + 1e-6).long().clamp(min=1)  # (B,)

    noise = torch.rand(B, G, generator=generator, device=generator.device if generator else device)
    noise = noise.to(device).masked_fill(torch.arange(G, device=device) >= pairs[:, None], 2.0)
    order = noise.argsort(dim=1, stable=True)  # (B, G): real pairs in random order, then padding
    shuffle = (order[..., None] * GROUP + torch.arange(GROUP, device=device)).flatten(1)  # (B, N2)
    restore = shuffle.argsort(dim=1)

    K = GROUP * int(kept_pairs.max())
    keep = shuffle[:, :K]
    real = torch.arange(G * GROUP, device=device) < valid_tokens[:, None]  # (B, N2)
    keep_real = (torch.arange(K, device=device) < GROUP * kept_pairs[:, None]) & real.gather(
        1, keep
    )
    visible = torch.zeros_like(real).scatter(1, keep, keep_real)
    return Masking(keep, keep_real, restore, real & ~visible, real)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Per-token normalised MSE over the masked tokens; pred/target (B, N, 256), masked (B, N)."""
    with torch.autocast(device_type=pred.device.type, enabled=False):
        pred, target = pred.float(), target.float()
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / torch.sqrt(var + 1e-6)
        per_token = ((pred - target) ** 2).mean(dim=-1)  # (B, N)
        return torch.where(masked, per_token, 0.0).sum() / masked.sum().clamp(min=1)


class MAEDecoder(nn.Module):
    """Visible latents (B, K, D) → predictions (B, N2, 256) for every token position."""

    def __init__(self, config: DecoderConfig, encoder_dim: int):
        super().__init__()
        Dd = config.embed_dim
        self.embed = nn.Linear(encoder_dim, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.pos_embed = nn.Parameter(torch.zeros(1, MAX_TOKENS, Dd))  # learned, zero init
        self.blocks = nn.ModuleList(
            Block(Dd, config.num_heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(Dd, eps=LN_EPS)
        self.pred = nn.Linear(Dd, PATCH_VALUES)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, latent: torch.Tensor, m: Masking) -> torch.Tensor:
        x = self.embed(latent)  # (B, K, Dd)
        B, K, Dd = x.shape
        N2 = m.restore.shape[1]
        mask_token = self.mask_token.to(x.dtype)
        x = torch.where(m.keep_real[..., None], x, mask_token)  # padding slots become mask tokens
        x = torch.cat([x, mask_token.expand(B, N2 - K, Dd)], dim=1)  # (B, N2, Dd), shuffled order
        x = x.gather(1, m.restore[..., None].expand(-1, -1, Dd))  # (B, N2, Dd), time order
        x = x + self.pos_embed[:, :N2]
        attn_mask = None if bool(m.real.all()) else m.real[:, None, None, :]  # padding not attended
        for blk in self.blocks:
            x = blk(x, attn_mask)
        return self.pred(self.norm(x))  # (B, N2, 256)


class MAEOutput(NamedTuple):
    loss: torch.Tensor  # () normalised MSE over masked real tokens
    pred: torch.Tensor  # (B, N, 256) predictions (normalised-target space)
    target: torch.Tensor  # (B, N, 256) dB log-mel patches (before normalisation)
    masked: torch.Tensor  # (B, N) bool: tokens in the loss


class MaskedAutoencoder(nn.Module):
    def __init__(
        self,
        encoder: EncoderConfig | str = "tiny",
        decoder: DecoderConfig | str | None = None,
        mask_ratio: float = 0.75,
    ):
        super().__init__()
        if decoder is None:
            if not isinstance(encoder, str) or encoder not in DEFAULT_DECODER:
                raise ValueError("name a decoder (one of DECODERS) for a custom encoder size")
            decoder = DEFAULT_DECODER[encoder]
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie strictly between 0 and 1, got {mask_ratio}")
        self.encoder = DashengEncoder(encoder_config(encoder))
        self.decoder_config = decoder_config(decoder)
        self.decoder = MAEDecoder(self.decoder_config, self.encoder.embed_dim)
        self.mask_ratio = mask_ratio

    def forward(
        self,
        mel: torch.Tensor,
        valid_frames=None,
        generator: torch.Generator | None = None,
    ) -> MAEOutput:
        """dB log-mel (B, 64, T ≤ 1008), float16/32 as stored in the shards → loss and predictions."""
        mel, valid_frames = check_mel(mel, valid_frames)
        B, _, T = mel.shape
        if T > MAX_TOKENS * FRAMES_PER_TOKEN:
            raise ValueError(
                f"MAE crops hold at most {MAX_TOKENS * FRAMES_PER_TOKEN} frames (10.08 s), got {T}"
            )
        mel = mel.to(self.encoder.time_pos_embed.device)
        if valid_frames is not None:
            valid_frames = valid_frames.to(mel.device)
        N = T // FRAMES_PER_TOKEN
        valid_tokens = (
            torch.full((B,), N, device=mel.device)
            if valid_frames is None
            else valid_frames // FRAMES_PER_TOKEN
        )

        target = patchify(mel)  # (B, N, 256) fp32, dB before init_bn
        x = self.encoder.add_positions(self.encoder.tokenize(mel, valid_frames))  # (B, N, D)
        if N % GROUP:
            x = torch.cat(
                [x, x.new_zeros(B, 1, x.shape[-1])], dim=1
            )  # (B, N2, D), one padding token

        m = group_masking(valid_tokens, N, self.mask_ratio, generator)
        visible = x.gather(1, m.keep[..., None].expand(-1, -1, x.shape[-1]))  # (B, K, D)
        latent = self.encoder.transformer(visible, m.keep_real)  # (B, K, D)
        pred = self.decoder(latent, m)[:, :N]  # (B, N, 256)
        masked = m.masked[:, :N]
        return MAEOutput(masked_mse(pred, target, masked), pred, target, masked)
