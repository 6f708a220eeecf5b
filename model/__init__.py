"""Dasheng: the encoder, its masked autoencoder, checkpoints and the HEAR API.

See model/README.md for the modules and their shapes.
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
