"""The HEAR 2021 module API over a Dasheng encoder.

    from dasheng_model import hear
    model = hear.load_model("dasheng_base.pt")      # official release, or our .safetensors
    scene = hear.get_scene_embeddings(audio, model)  # audio: (n_sounds, n_samples) at 16 kHz
    emb, ts = hear.get_timestamp_embeddings(audio, model)

``load_model`` takes any model spec of :mod:`dasheng_model.pretrained`: an official ``.pt`` release, one
of our ``.safetensors`` checkpoints (encoder or MAE), a Hugging Face-format folder or repo id,
``"random:<size>[:<seed>]"`` (e.g. ``"random:tiny"``), or ``""`` for a randomly initialised
``base`` encoder (HEAR's "no weights" case). Random weights come from a fixed seed (0 unless
given), so they are the same each time.

``load_model(path, device=None, dtype="fp32")``: ``dtype="bf16"`` runs the encoder under bf16
autocast (CPU or GPU; front end in fp32, embeddings float32), see ``dasheng_model.embed``.

Timestamp embeddings are the encoder's 25 Hz frames; a frame's timestamp is the centre of the
four mel frames it covers (40·k + 15 ms). Scene embeddings are the mean of the frames.
Each sound's log-mel is cut into windows of 1008 mel frames (10.08 s, the model's chunk), and the
windows of all sounds go through the encoder together, ``batch_size`` at a time
(``dasheng_model.windows``, the batcher every embedding path of the project uses).
``load_model(path, layer=...)`` takes the embeddings from another block than the last
(``"last"``, a block number 1 … depth, or ``"mean"`` of all blocks; see ``dasheng_model.embed``).
"""

from __future__ import annotations

import torch
from torch import nn

from dasheng_model import pretrained
from dasheng_model.embed import Layer, check_layer, frame_times_ms
from dasheng_model.encoder import DashengEncoder
from dasheng_model.frontend import SAMPLE_RATE
from dasheng_model.inputs import check_dtype, check_waveform
from dasheng_model.pretrained import RANDOM_PREFIX, RANDOM_SEED, random_encoder
from dasheng_model.windows import embed_mels

__all__ = [
    "RANDOM_PREFIX",
    "RANDOM_SEED",
    "HearModel",
    "load_model",
    "random_encoder",
    "get_scene_embeddings",
    "get_timestamp_embeddings",
]


class HearModel(nn.Module):
    """A Dasheng encoder with the attributes the HEAR API asks for."""

    sample_rate = SAMPLE_RATE

    def __init__(
        self, encoder: DashengEncoder, batch_size: int = 16, dtype="fp32", layer: Layer = "last"
    ):
        super().__init__()
        self.encoder = encoder.eval()
        self.dtype = check_dtype(dtype)  # "fp32" or "bf16" (autocast)
        self.layer = check_layer(
            layer, len(encoder.blocks)
        )  # which block's output is the embedding
        self.scene_embedding_size = encoder.embed_dim
        self.timestamp_embedding_size = encoder.embed_dim
        self.batch_size = batch_size  # 10.08 s windows per forward pass


def load_model(
    model_file_path: str = "",
    device: str | torch.device | None = None,
    dtype="fp32",
    layer: Layer = "last",
) -> HearModel:
    dtype = check_dtype(dtype)  # before loading anything: a bad dtype fails fast
    encoder = random_encoder("base") if model_file_path == "" else pretrained.load(model_file_path)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return HearModel(encoder, dtype=dtype, layer=layer).to(device)


def _check_audio(audio: torch.Tensor) -> None:
    if not isinstance(audio, torch.Tensor) or audio.ndim != 2:
        shape = tuple(audio.shape) if isinstance(audio, torch.Tensor) else type(audio).__name__
        raise ValueError(
            f"expected audio as a Tensor[n_sounds, n_samples] (mono, {SAMPLE_RATE} Hz), got {shape}"
        )
    if audio.shape[0] == 0:
        raise ValueError("expected at least one sound, got Tensor[0, n_samples]")


def embed_sounds(
    encoder: DashengEncoder, audio: torch.Tensor, batch_size: int, dtype="fp32", layer="last"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_sounds, n_samples) at 16 kHz → (frames (n, T, D), clip embeddings (n, D)) float32, on
    the audio's device: each sound's log-mel in windows through the batcher."""
    wav, _ = check_waveform(audio)
    device = encoder.time_pos_embed.device
    with torch.no_grad():
        mels = encoder.front_end(wav.to(device))  # (n, 64, T): per sound, as alone
    out = embed_mels(encoder, list(mels), batch_size, dtype, layer)
    frames = torch.stack([f for f, _ in out]).to(audio.device)
    return frames, torch.stack([c for _, c in out]).to(audio.device)


def get_timestamp_embeddings(
    audio: torch.Tensor, model: HearModel
) -> tuple[torch.Tensor, torch.Tensor]:
    """→ (embeddings (n_sounds, T, D) float32, timestamps (n_sounds, T) in ms at frame centres)."""
    _check_audio(audio)
    frames, _ = embed_sounds(model.encoder, audio, model.batch_size, model.dtype, model.layer)
    n, T, _ = frames.shape
    timestamps = frame_times_ms(T).to(frames.device).expand(n, T).contiguous()
    return frames, timestamps


def get_scene_embeddings(audio: torch.Tensor, model: HearModel) -> torch.Tensor:
    """→ (n_sounds, D) float32: the mean of each sound's frame embeddings."""
    _check_audio(audio)
    return embed_sounds(model.encoder, audio, model.batch_size, model.dtype, model.layer)[1]
