"""Saving and loading weights without ever unpickling untrusted data.

Our format: ``NAME.safetensors`` (tensors, plus the config and provenance as JSON strings in its
metadata, so the file is self-contained) and ``NAME.json`` beside it (the same config and
provenance and the weights' sha256, for people and other stages). Both are written atomically.

The official releases (``dasheng_base.pt`` …) are ``torch.save`` files holding
``{'model': state_dict, 'config': {...}}``. They are read with ``torch.load(weights_only=True)``,
which only rebuilds tensors and plain containers: a pickle that would run code is refused.

Every load is strict: missing, unexpected or wrongly shaped keys raise a ``CheckpointError``
that lists them and names the model size the checkpoint's shapes fit.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import secrets
import sys
import zipfile
from dataclasses import asdict
from importlib import metadata as importlib_metadata
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from dasheng_model.encoder import SIZES, DashengEncoder, EncoderConfig, size_name
from dasheng_model.frontend import MEL_PARAMS
from dasheng_model.mae import DecoderConfig, MaskedAutoencoder

FORMAT = "dasheng-pipeline/1"
SUFFIX = ".safetensors"
META_KEY = "dasheng"  # safetensors metadata entry: {"config": ..., "provenance": ...}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose weights do not fit the model."""


# -- what a checkpoint's shapes say ------------------------------------------------------------


def infer_encoder_config(
    state_dict: dict[str, torch.Tensor], num_heads: int | None = None
) -> EncoderConfig | None:
    """Embed dim, depth and MLP ratio read off the shapes; heads from ``num_heads`` or the size table.

    None when the weights are not a Dasheng encoder's, or the heads cannot be told.
    """
    proj = state_dict.get("patch_embed.proj.weight")
    fc1 = state_dict.get("blocks.0.mlp.fc1.weight")
    if proj is None or fc1 is None or proj.ndim != 4:
        return None
    dim = int(proj.shape[0])
    depth = 1 + max(int(m.group(1)) for k in state_dict if (m := _BLOCK_KEY.match(k)))
    mlp_ratio = fc1.shape[0] / dim
    if num_heads is None:
        known = [
            c
            for c in SIZES.values()
            if (c.embed_dim, c.depth, c.mlp_ratio) == (dim, depth, mlp_ratio)
        ]
        if not known:
            return None
        num_heads = known[0].num_heads
    return EncoderConfig(embed_dim=dim, depth=depth, num_heads=int(num_heads), mlp_ratio=mlp_ratio)


def _describe_fit(state_dict: dict[str, torch.Tensor]) -> str:
    proj = state_dict.get("patch_embed.proj.weight")
    if proj is None:
        return "its keys are not those of a Dasheng encoder (no patch_embed.proj.weight)"
    config = infer_encoder_config(state_dict)
    if config is not None and size_name(config):
        c = config
        return f"its shapes fit size {size_name(c)!r} (embed_dim {c.embed_dim}, depth {c.depth}, {c.num_heads} heads)"
    depth = 1 + max((int(m.group(1)) for k in state_dict if (m := _BLOCK_KEY.match(k))), default=-1)
    return (
        f"its shapes (embed_dim {proj.shape[0]}, depth {depth}) fit no size in {sorted(SIZES)}; "
        "build a DashengEncoder with a matching EncoderConfig"
    )


def _natural(key: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def _listing(keys: list[str], limit: int = 12) -> str:
    more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_state_dict_strict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint"
) -> None:
    """``model.load_state_dict(strict=True)`` with an error that says what differs and what would fit."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict), key=_natural)
    unexpected = sorted(set(state_dict) - set(expected), key=_natural)
    wrong_shape = [
        f"{k} {tuple(state_dict[k].shape)} (model: {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys: {_listing(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
        if wrong_shape:
            problems.append(f"{len(wrong_shape)} keys of the wrong shape: {_listing(wrong_shape)}")
        encoder_keys = state_dict
        if isinstance(model, MaskedAutoencoder):
            encoder_keys = {
                k[len("encoder.") :]: v for k, v in state_dict.items() if k.startswith("encoder.")
            }
        raise CheckpointError(
            f"{source} does not fit this model ({_model_label(model)}); {_describe_fit(encoder_keys)}. "
            + "; ".join(problems)
        )
    model.load_state_dict(state_dict, strict=True)


def _model_label(model: nn.Module) -> str:
    encoder = model.encoder if isinstance(model, MaskedAutoencoder) else model
    config = getattr(encoder, "config", None)
    if not isinstance(config, EncoderConfig):
        return type(model).__name__
    name = size_name(config)
    return f"size {name!r}" if name else f"custom size {config}"


# -- our format --------------------------------------------------------------------------------


def model_config(model: DashengEncoder | MaskedAutoencoder) -> dict:
    """The JSON config that rebuilds ``model``."""
    if isinstance(model, MaskedAutoencoder):
        return {
            "format": FORMAT,
            "kind": "mae",
            "size": size_name(model.encoder.config),
            "encoder": asdict(model.encoder.config),
            "decoder": asdict(model.decoder_config),
            "mask_ratio": model.mask_ratio,
            "mel": MEL_PARAMS,
        }
    if isinstance(model, DashengEncoder):
        return {
            "format": FORMAT,
            "kind": "encoder",
            "size": size_name(model.config),
            "encoder": asdict(model.config),
            "mel": MEL_PARAMS,
        }
    raise TypeError(f"expected a DashengEncoder or MaskedAutoencoder, got {type(model).__name__}")


def build_from_config(config: dict) -> DashengEncoder | MaskedAutoencoder:
    try:
        if config.get("format") != FORMAT:
            raise CheckpointError(
                f"unknown checkpoint format {config.get('format')!r}; expected {FORMAT!r}"
            )
        if config.get("mel", MEL_PARAMS) != MEL_PARAMS:
            raise CheckpointError(
                f"checkpoint front end {config['mel']} differs from this model's {MEL_PARAMS}"
            )
        encoder = EncoderConfig(**config["encoder"])
        if config["kind"] == "encoder":
            return DashengEncoder(encoder)
        if config["kind"] == "mae":
            return MaskedAutoencoder(
                encoder, DecoderConfig(**config["decoder"]), config["mask_ratio"]
            )
        raise CheckpointError(
            f"unknown checkpoint kind {config['kind']!r}; expected 'encoder' or 'mae'"
        )
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"malformed checkpoint config {config!r}: {exc!r}") from exc


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def write_atomically(path: Path, write) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, fsync, then rename it to ``path``: a
    process killed mid-write never leaves a file under the final name."""
    tmp = str(path.with_name(f"{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"))
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def library_provenance(config: dict, seed: int | None = None) -> dict:
    """The stamp a checkpoint gets when its caller gives none: a hash of the model config, the
    seed and the library's versions (the pipeline passes its own, richer stamp)."""
    versions = {"python": ".".join(map(str, sys.version_info[:3]))}
    for name in ("dasheng-pipeline", "torch", "safetensors"):
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    digest = hashlib.sha256(
        json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    return {"config_hash": digest[:16], "seed": seed, "versions": versions, "git_sha": None}


def save_checkpoint(
    model: DashengEncoder | MaskedAutoencoder,
    path: str | Path,
    provenance: dict | None = None,
    seed: int | None = None,
) -> Path:
    """Write ``path`` (.safetensors) and its ``.json`` sidecar atomically; returns ``path``.

    ``provenance``: the stamp of the run that made the weights (the pipeline passes
    ``dasheng_pipeline.common.provenance.stamp(...)``); by default :func:`library_provenance`.
    """
    path = Path(path)
    if path.suffix != SUFFIX:
        raise ValueError(f"checkpoint path must end in {SUFFIX}, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    config = model_config(model)
    if provenance is None:
        provenance = library_provenance(config, seed)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # One metadata entry: safetensors writes its metadata map in no fixed order, so two entries
    # would make the same weights give different bytes from run to run.
    metadata = {META_KEY: json.dumps({"config": config, "provenance": provenance}, sort_keys=True)}
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    sidecar = {"config": config, "provenance": provenance, "weights": path.name, "sha256": sha}
    text = json.dumps(sidecar, sort_keys=True, indent=1, ensure_ascii=True, allow_nan=False) + "\n"
    write_atomically(sidecar_path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def read_metadata(path: str | Path) -> dict:
    """Config and provenance stored in one of our .safetensors checkpoints."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta[META_KEY]) if META_KEY in meta else {}
    except (SafetensorError, OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({exc})") from exc


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> DashengEncoder | MaskedAutoencoder:
    """One of our checkpoints → the model it holds (encoder or MAE), in eval mode."""
    meta = read_metadata(path)
    if "config" not in meta:
        raise CheckpointError(
            f"{path}: no model config in its metadata; not a checkpoint of this project"
        )
    model = build_from_config(meta["config"])
    try:
        state_dict = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors checkpoint ({exc})") from exc
    load_state_dict_strict(model, state_dict, source=str(path))
    return model.to(map_location).eval()


# -- official releases -------------------------------------------------------------------------


def read_torch_file(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        culprit = next(
            (line.strip() for line in str(exc).splitlines() if "Unsupported" in line), ""
        )
        culprit = culprit.split(" was not an allowed global")[0].removeprefix(
            "WeightsUnpickler error: "
        )
        raise CheckpointError(
            f"{path}: refused to load: the file holds objects other than tensors and plain containers "
            f"(unpickling it could run code), so it is not a plain weights file. {culprit}".rstrip()
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({exc})") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path}: expected a dict {{'model': state_dict, 'config': {{...}}}}, got {type(obj).__name__}"
        )
    return obj


def load_official(
    path: str | Path, size: str | None = None, map_location: str | torch.device = "cpu"
) -> DashengEncoder:
    """An official ``{'model': state_dict, 'config': {...}}`` file (or a bare state dict) → encoder, eval mode."""
    path = Path(path)
    obj = read_torch_file(path)
    state_dict = obj.get("model", obj)
    release_config = obj.get("config", {}) if "model" in obj else {}
    if not isinstance(state_dict, dict) or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        raise CheckpointError(f"{path}: its 'model' entry is not a state dict of tensors")
    if size is not None:
        config = SIZES.get(size)
        if config is None:
            raise CheckpointError(f"unknown model size {size!r}; expected one of {sorted(SIZES)}")
    else:
        heads = release_config.get("num_heads") if isinstance(release_config, dict) else None
        config = infer_encoder_config(state_dict, heads)
        if config is None:
            raise CheckpointError(
                f"{path}: cannot tell the model size: {_describe_fit(state_dict)}"
            )
    model = DashengEncoder(config)
    load_state_dict_strict(model, state_dict, source=str(path))
    return model.to(map_location).eval()


def load_encoder(
    path: str | Path, size: str | None = None, map_location: str | torch.device = "cpu"
) -> DashengEncoder:
    """Any encoder weights → ``DashengEncoder`` in eval mode.

    Reads our .safetensors (an exported encoder, or the encoder of an MAE checkpoint) and the
    official .pt releases. ``size`` insists on a size from ``SIZES`` (an error otherwise).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as fh:
        head = fh.read(2)
    if head == b"PK" or head[:1] == b"\x80":  # torch.save zip archive, or a legacy pickle
        return load_official(path, size, map_location)
    model = load_checkpoint(path, map_location)
    encoder = model.encoder if isinstance(model, MaskedAutoencoder) else model
    if size is not None and encoder.config != SIZES.get(size):
        raise CheckpointError(
            f"{path} holds size {size_name(encoder.config) or encoder.config!r}, not the requested {size!r}"
        )
    return encoder
