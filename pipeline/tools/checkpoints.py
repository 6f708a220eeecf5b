"""What a checkpoint is: ``dasheng-pipeline inspect`` and :func:`describe_checkpoint`."""

from __future__ import annotations

import json
import os
from pathlib import Path

from dasheng_model import checkpoint, pretrained
from dasheng_model.encoder import size_name
from dasheng_model.mae import MaskedAutoencoder


def _format(path: Path) -> str:
    if pretrained.is_hf(path):
        return "huggingface"
    with open(path, "rb") as fh:
        head = fh.read(2)
    return "official" if head == b"PK" or head[:1] == b"\x80" else "dasheng-pipeline"


def describe_checkpoint(spec: str | os.PathLike) -> dict:
    """Format, model size, parameters, bytes, sha256 and provenance of any model spec.

    Raises ``dasheng_model.checkpoint.CheckpointError`` (one line, naming the file) for what does not load.
    """
    text = os.fspath(spec)
    path = Path(text).expanduser()
    info: dict = {"model": text}
    if text.startswith(pretrained.RANDOM_PREFIX):
        size, seed = pretrained.parse_random(text)
        info.update(format="random", kind="encoder", seed=seed)
        encoder = pretrained.load(text)
        model = encoder
    elif path.exists():
        info["format"] = fmt = _format(path)
        if fmt == "dasheng-pipeline":
            model = checkpoint.load_checkpoint(path)
            meta = checkpoint.read_metadata(path)
            info["provenance"] = meta.get("provenance")
            info["kind"] = meta.get("config", {}).get("kind")
        elif fmt == "official":
            model = checkpoint.load_official(path)
            info["kind"] = "encoder"
            info["release_config"] = checkpoint.read_torch_file(path).get("config")
        else:
            model = pretrained.load_hf(path)
            info["kind"] = "encoder"
            config = (path if path.is_dir() else path.parent) / pretrained.HF_CONFIG
            if config.is_file():
                info["hf_config"] = json.loads(config.read_text(encoding="utf-8"))
        encoder = model.encoder if isinstance(model, MaskedAutoencoder) else model
        weights = path / pretrained.HF_WEIGHTS if path.is_dir() else path
        info["bytes"] = weights.stat().st_size
    else:
        model = encoder = pretrained.load(text)  # a hub id, or a one-line error
        info.update(format="huggingface", kind="encoder")
    c = encoder.config
    info.update(
        size=size_name(c) or "custom",
        embed_dim=c.embed_dim,
        depth=c.depth,
        num_heads=c.num_heads,
        parameters=sum(p.numel() for p in model.parameters()),
        encoder_parameters=sum(p.numel() for p in encoder.parameters()),
        sha256=pretrained.weights_sha256(text, encoder),
    )
    return info


def render(info: dict) -> str:
    """The description as aligned ``key: value`` lines (nested dicts as JSON)."""
    width = max(map(len, info))
    return "\n".join(
        f"{k:<{width}}  {json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v}"
        for k, v in info.items()
    )
