"""The HEAR 2021 module API over a Dasheng encoder.

    from model import hear
    model = hear.load_model("dasheng_base.pt")      # official release, or our .safetensors
    scene = hear.get_scene_embeddings(audio, model)  # audio: (n_sounds, n_samples) at 16 kHz
    emb, ts = hear.get_timestamp_embeddings(audio, model)

``load_model`` paths: an official ``.pt`` release, one of our ``.safetensors`` checkpoints
(encoder or MAE), ``""`` for a randomly initialised ``base`` encoder (HEAR's "no weights" case),
or ``"random:<size>"`` (e.g. ``"random:tiny"``) for a random encoder of any size in
``model.encoder.SIZES``. Random weights come from a fixed seed (0), so they are the same each time.

Timestamp embeddings are the encoder's 25 Hz frames; a frame's timestamp is the centre of the
four mel frames it covers (40·k + 15 ms). Scene embeddings are the mean of the frames.
Clips longer than 10.08 s go through the model in chunks of 252 frames, concatenated.
``load_model(path, layer=...)`` takes the embeddings from another block than the last
(``"last"``, a block number 1 … depth, or ``"mean"`` of all blocks; see ``model.embed``).
"""

from __future__ import annotations

import torch
from torch import nn

from model.checkpoint import load_encoder
from model.embed import Layer, check_layer, embed, frame_times_ms
from model.encoder import DashengEncoder
from model.frontend import SAMPLE_RATE

RANDOM_PREFIX = "random:"
RANDOM_SEED = 0


class HearModel(nn.Module):
    """A Dasheng encoder with the attributes the HEAR API asks for."""

    sample_rate = SAMPLE_RATE

    def __init__(self, encoder: DashengEncoder, batch_size: int = 16, layer: Layer = "last"):
        super().__init__()
        self.encoder = encoder.eval()
        self.layer = check_layer(layer, len(encoder.blocks))  # which block's output is the embedding
        self.scene_embedding_size = encoder.embed_dim
        self.timestamp_embedding_size = encoder.embed_dim
        self.batch_size = batch_size  # sounds per forward pass


def random_encoder(size: str = "base", seed: int = RANDOM_SEED) -> DashengEncoder:
    """A randomly initialised encoder, the same for the same size and seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DashengEncoder(size).eval()


def load_model(model_file_path: str = "", device: str | torch.device | None = None, layer: Layer = "last") -> HearModel:
    if model_file_path == "":
        encoder = random_encoder("base")
    elif model_file_path.startswith(RANDOM_PREFIX):
        encoder = random_encoder(model_file_path[len(RANDOM_PREFIX):])
    else:
        encoder = load_encoder(model_file_path)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return HearModel(encoder, layer=layer).to(device)


def _check_audio(audio: torch.Tensor) -> None:
    if not isinstance(audio, torch.Tensor) or audio.ndim != 2:
        shape = tuple(audio.shape) if isinstance(audio, torch.Tensor) else type(audio).__name__
        raise ValueError(f"expected audio as a Tensor[n_sounds, n_samples] (mono, {SAMPLE_RATE} Hz), got {shape}")
    if audio.shape[0] == 0:
        raise ValueError("expected at least one sound, got Tensor[0, n_samples]")


def _frames(audio: torch.Tensor, model: HearModel) -> torch.Tensor:
    """(n_sounds, n_samples) → (n_sounds, T, D) frame embeddings, in batches of ``model.batch_size``."""
    _check_audio(audio)
    parts = [embed(model.encoder, chunk, layer=model.layer).frames for chunk in audio.split(model.batch_size)]
    return torch.cat(parts).to(audio.device)


def get_timestamp_embeddings(audio: torch.Tensor, model: HearModel) -> tuple[torch.Tensor, torch.Tensor]:
    """→ (embeddings (n_sounds, T, D) float32, timestamps (n_sounds, T) in ms at frame centres)."""
    frames = _frames(audio, model)
    n, T, _ = frames.shape
    timestamps = frame_times_ms(T).to(frames.device).expand(n, T).contiguous()
    return frames, timestamps


def get_scene_embeddings(audio: torch.Tensor, model: HearModel) -> torch.Tensor:
    """→ (n_sounds, D) float32: the mean of each sound's frame embeddings."""
    return _frames(audio, model).mean(dim=1)
