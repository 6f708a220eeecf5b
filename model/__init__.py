"""The Dasheng model library: the encoder, its masked autoencoder, checkpoints, embeddings, HEAR.

It needs torch, torchaudio, safetensors and numpy only, and no stage code. The modules and their
shapes: docs/model.md (model/README.md points there).
"""

from dasheng_model.checkpoint import CheckpointError, load_checkpoint, load_encoder, save_checkpoint
from dasheng_model.embed import Embeddings, embed, embed_mel
from dasheng_model.encoder import SIZES, DashengEncoder, EncoderConfig
from dasheng_model.frontend import MEL_PARAMS, LogMel
from dasheng_model.mae import DECODERS, DecoderConfig, MaskedAutoencoder

__all__ = [
    "CheckpointError",
    "DECODERS",
    "DashengEncoder",
    "DecoderConfig",
    "Embeddings",
    "EncoderConfig",
    "LogMel",
    "MEL_PARAMS",
    "MaskedAutoencoder",
    "SIZES",
    "embed",
    "embed_mel",
    "load_checkpoint",
    "load_encoder",
    "save_checkpoint",
]
