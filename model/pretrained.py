"""Every way to name an encoder, resolved in one place, and the named constructors.

A *model spec* is the string that ``--model``, the HEAR module and the DAG's ``models:`` accept:

- ``random:<size>`` or ``random:<size>:<seed>`` — a seeded random-init encoder (``random:tiny``);
- a path to a checkpoint file: an official ``.pt`` release, or one of our ``.safetensors``
  (encoder or MAE) — see :mod:`dasheng_model.checkpoint`;
- a path to a Hugging Face-format model: a folder holding ``model.safetensors`` and
  ``config.json`` (``mispeech/dasheng-base`` …), or that ``model.safetensors`` file itself;
- a Hugging Face repo id (``mispeech/dasheng-base``), fetched through ``huggingface_hub`` when it
  is installed and the network allows; the hub's cache and ``HF_HUB_OFFLINE`` apply.

The Hugging Face format: ``model.safetensors`` holds the official encoder keys under an
``encoder.`` prefix, without the front end's fixed buffers (``front_end.*``, rebuilt here);
``config.json`` has ``encoder_kwargs`` with ``embed_dim``, ``depth`` and ``num_heads``.

Named constructors, as the official package has them (``dasheng.dasheng_base(path=None)``):
they return the RELEASED weights unless told otherwise::

    from dasheng_model.pretrained import dasheng_base
    encoder = dasheng_base()                        # the release: a local copy, or the hub
    encoder = dasheng_base("dasheng_base.pt")       # a file (any spec: .pt, HF folder or repo id, ours)
    encoder = dasheng_base(pretrained=False)        # random init (seed 0), as random:base

Where ``dasheng_base()`` finds the release, in order: the official package's download
(``$TORCH_HOME/hub/checkpoints/dasheng_base.pt``, where ``dasheng.dasheng_base()`` puts it), then
the Hugging Face cache (``mispeech/dasheng-base``, ``$HF_HOME``), then the hub itself. Offline
(``HF_HUB_OFFLINE=1``, or no network) with neither copy it raises a one-line ``CheckpointError``
saying how to get the weights; it never falls back to random weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dasheng_model.checkpoint import (
    CheckpointError,
    library_provenance,
    load_encoder,
    load_state_dict_strict,
    model_config,
    write_atomically,
)
from dasheng_model.encoder import MAX_TOKENS, SIZES, DashengEncoder, EncoderConfig, size_name
from dasheng_model.frontend import N_MELS
from dasheng_model.inputs import FRAMES_PER_TOKEN

log = logging.getLogger(__name__)

RANDOM_PREFIX = "random:"
RANDOM_SEED = 0
HF_WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"
HF_PREFIX = "encoder."
HF_OURS = "dasheng_pipeline"  # config.json entry: this project's config and provenance
_FRONT_END = "front_end."
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HF_REPOS = {
    "base": "mispeech/dasheng-base",
    "0.6B": "mispeech/dasheng-0.6B",
    "1.2B": "mispeech/dasheng-1.2B",
}


# -- random weights --------------------------------------------------------------------------


def random_encoder(size: str | EncoderConfig = "base", seed: int = RANDOM_SEED) -> DashengEncoder:
    """A randomly initialised encoder, the same for the same size and seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DashengEncoder(size).eval()


def parse_random(spec: str) -> tuple[str, int]:
    """``random:<size>[:<seed>]`` → (size, seed)."""
    size, _, seed = spec[len(RANDOM_PREFIX) :].partition(":")
    if size not in SIZES:
        raise CheckpointError(
            f"model {spec!r}: unknown size {size!r}; expected random:<size> with size in {sorted(SIZES)}"
        )
    if seed and not seed.isdigit():
        raise CheckpointError(
            f"model {spec!r}: the seed after the size must be a whole number, e.g. random:{size}:0"
        )
    return size, int(seed) if seed else RANDOM_SEED


# -- the Hugging Face format -----------------------------------------------------------------


def _hf_config(folder: Path) -> EncoderConfig | None:
    path = folder / HF_CONFIG
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        kwargs = config["encoder_kwargs"]
        return EncoderConfig(
            embed_dim=int(kwargs["embed_dim"]),
            depth=int(kwargs["depth"]),
            num_heads=int(kwargs["num_heads"]),
            mlp_ratio=float(kwargs.get("mlp_ratio", 4.0)),
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: expected a JSON object with encoder_kwargs {{embed_dim, depth, num_heads}} ({exc!r})"
        ) from exc


def load_hf(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> DashengEncoder:
    """A Hugging Face-format folder (or its ``model.safetensors``) → encoder in eval mode.

    Keys outside ``encoder.`` (a classifier head of a fine-tuned release) are left out, with a
    note in the log; the size comes from ``config.json`` when present, else from the shapes.
    """
    path = Path(path)
    weights = path / HF_WEIGHTS if path.is_dir() else path
    if not weights.is_file():
        raise CheckpointError(
            f"{path}: no {HF_WEIGHTS} in this folder; expected a Hugging Face-format model"
        )
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights}: corrupt safetensors file ({exc})") from exc
    state = {k[len(HF_PREFIX) :]: v for k, v in tensors.items() if k.startswith(HF_PREFIX)}
    others = sorted(k for k in tensors if not k.startswith(HF_PREFIX))
    if not state:
        raise CheckpointError(
            f"{weights}: no '{HF_PREFIX}*' keys; not a Hugging Face-format Dasheng model"
        )
    if others:
        log.info(f"{weights}: left out {len(others)} keys outside the encoder ({others[0]} …)")
    config = _hf_config(weights.parent)
    if config is None:
        from dasheng_model.checkpoint import infer_encoder_config

        config = infer_encoder_config(state)
        if config is None:
            raise CheckpointError(
                f"{weights}: no {HF_CONFIG} beside it and the shapes fit no known size"
            )
    model = DashengEncoder(config)
    for key, value in model.state_dict().items():  # the front end's fixed buffers are not stored
        if key.startswith(_FRONT_END):
            state.setdefault(key, value)
    load_state_dict_strict(model, state, source=str(weights))
    return model.to(map_location).eval()


def hf_config(encoder: DashengEncoder, provenance: dict | None = None) -> dict:
    """``config.json`` of the published layout (``name``, ``encoder_kwargs`` as the hub's
    ``DashengConfig`` writes them), plus this project's config and provenance under ``dasheng_pipeline``."""
    c = encoder.config
    config = model_config(encoder)
    return {
        "architectures": ["DashengModel"],
        "model_type": "dasheng",
        "name": f"dasheng-{size_name(c) or 'custom'}",
        "encoder_kwargs": {
            "embed_dim": c.embed_dim,
            "depth": c.depth,
            "num_heads": c.num_heads,
            "mlp_ratio": c.mlp_ratio,
            "patch_size": [N_MELS, FRAMES_PER_TOKEN],
            "patch_stride": [N_MELS, FRAMES_PER_TOKEN],
            "target_length": MAX_TOKENS * FRAMES_PER_TOKEN,
        },
        "torch_dtype": "float32",
        HF_OURS: {
            "config": config,
            "provenance": provenance if provenance is not None else library_provenance(config),
        },
    }


def save_hf(
    encoder: DashengEncoder, folder: str | os.PathLike, provenance: dict | None = None
) -> Path:
    """Write ``encoder`` in the Hugging Face layout (``model.safetensors`` + ``config.json``).

    ``provenance``: the stamp to record in ``config.json`` (default :func:`library_provenance`).
    Each file is written atomically; the folder is created when missing.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        HF_PREFIX + k: v.detach().cpu().contiguous()
        for k, v in encoder.state_dict().items()
        if not k.startswith(_FRONT_END)
    }
    text = json.dumps(hf_config(encoder, provenance), indent=2, sort_keys=True) + "\n"
    write_atomically(
        folder / HF_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"})
    )
    write_atomically(folder / HF_CONFIG, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return folder


def is_hf(path: Path) -> bool:
    return (path.is_dir() and (path / HF_WEIGHTS).is_file()) or (
        path.is_file() and path.name == HF_WEIGHTS
    )


def _snapshot(repo_id: str) -> Path:
    """The hub's copy of ``repo_id`` (weights and config only): from the Hugging Face cache, or
    downloaded into it. Raises what huggingface_hub raises (offline, 404, auth, timeout)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise CheckpointError(
            f"model {repo_id!r} is not a local path, and huggingface_hub is not installed to fetch it "
            "from the hub: pip install huggingface_hub, or download the folder yourself and pass its path"
        ) from exc
    return Path(snapshot_download(repo_id, allow_patterns=[HF_WEIGHTS, HF_CONFIG]))


def _reason(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else "no message"
    return f"{type(exc).__name__}: {line if len(line) <= limit else line[: limit - 1] + '…'}"


def download(repo_id: str) -> Path:
    """The hub's copy of ``repo_id`` (weights and config only), downloaded once into its cache."""
    try:
        return _snapshot(repo_id)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - the hub raises many kinds (offline, 404, auth, timeout)
        raise CheckpointError(
            f"model {repo_id!r}: not a local path, and fetching it from the Hugging Face hub failed "
            f"({_reason(exc)}); on a machine with network run `hf download {repo_id}` and pass the "
            "folder it prints, or check the name"
        ) from exc


# -- one resolver ------------------------------------------------------------------------------


def load(spec: str | os.PathLike, map_location: str | torch.device = "cpu") -> DashengEncoder:
    """Any model spec (see the module docstring) → ``DashengEncoder`` in eval mode."""
    text = os.fspath(spec)
    if text.startswith(RANDOM_PREFIX):
        size, seed = parse_random(text)
        return random_encoder(size, seed).to(map_location)
    path = Path(text).expanduser()
    if path.exists():
        if is_hf(path):
            return load_hf(path, map_location)
        if path.is_dir():
            raise CheckpointError(
                f"{path}: a folder without {HF_WEIGHTS}; pass a checkpoint file or a Hugging Face-format folder"
            )
        return load_encoder(path, map_location=map_location)
    if _REPO_ID.match(text) and not text.endswith((".pt", ".safetensors", ".pth")):
        return load_hf(download(text), map_location)
    raise CheckpointError(
        f"model {text!r}: no such file or folder; expected a checkpoint (.pt, .safetensors), a Hugging Face "
        "folder or repo id (owner/name), or random:<size>"
    )


def weights_sha256(spec: str | os.PathLike, encoder: DashengEncoder | None = None) -> str:
    """sha256 of the weights a spec names: the file's bytes (the HF folder's ``model.safetensors``),
    or for ``random:`` and hub ids, of the tensors themselves in key order."""
    path = Path(os.fspath(spec)).expanduser()
    if path.is_dir() and (path / HF_WEIGHTS).is_file():
        path = path / HF_WEIGHTS
    if path.is_file():
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    encoder = encoder if encoder is not None else load(spec)
    digest = hashlib.sha256()
    for key, value in encoder.state_dict().items():
        digest.update(key.encode())
        digest.update(
            value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()


# -- named constructors ------------------------------------------------------------------------

ZENODO_RECORD = "https://zenodo.org/records/11511780"
RELEASE_FILES = {"base": "dasheng_base.pt", "0.6B": "dasheng_06b.pt", "1.2B": "dasheng_12b.pt"}
_CONSTRUCTORS = {"base": "dasheng_base", "0.6B": "dasheng_06B", "1.2B": "dasheng_12B"}


def official_download(size: str) -> Path:
    """Where the official package's ``dasheng_base()`` … keeps the release it downloaded
    (torch.hub's cache: ``$TORCH_HOME/hub/checkpoints/dasheng_base.pt``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / RELEASE_FILES[size]


def released(size: str, map_location: str | torch.device = "cpu") -> DashengEncoder:
    """The released weights of ``size`` (base, 0.6B, 1.2B) from this machine or the hub.

    In order: the official package's download, the Hugging Face cache, the hub (when online).
    Raises a one-line ``CheckpointError`` saying how to get them when none of these has them.
    """
    local = official_download(size)
    if local.is_file():
        return _of_size(load(local, map_location), size, local)
    repo = _HF_REPOS[size]
    try:
        folder = _snapshot(repo)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - offline, no network, 404, auth, timeout
        raise CheckpointError(_missing_release(size, local, exc)) from exc
    return _of_size(load_hf(folder, map_location), size, folder)


def _missing_release(size: str, local: Path, exc: Exception) -> str:
    from huggingface_hub import constants

    name, repo, file = _CONSTRUCTORS[size], _HF_REPOS[size], RELEASE_FILES[size]
    why = (
        "HF_HUB_OFFLINE is set"
        if constants.HF_HUB_OFFLINE
        else f"fetching {repo} from the hub failed ({_reason(exc)})"
    )
    return (
        f"{name}(): the released weights are neither in {local} nor in the Hugging Face cache "
        f"{constants.HF_HUB_CACHE}, and {why}; run `hf download {repo}` on a machine with network "
        f"(and copy its cache here), or download {file} from {ZENODO_RECORD} and call "
        f"{name}('{file}'); {name}(pretrained=False) gives random weights"
    )


def _named(size: str, path, pretrained: bool, map_location, weights) -> DashengEncoder:
    if weights is not None:  # the earlier name of ``path``
        if path is not None:
            raise TypeError(f"{_CONSTRUCTORS[size]}(): pass path or weights, not both")
        path = weights
    if not pretrained:
        if path is not None:
            raise ValueError(
                f"{_CONSTRUCTORS[size]}(): path={os.fspath(path)!r} with pretrained=False; "
                "pass one of them (pretrained=False means random weights)"
            )
        return random_encoder(size).to(map_location)
    if path is None:
        return released(size, map_location)
    return _of_size(load(_HF_REPOS[size] if path == "hub" else path, map_location), size, path)


def _of_size(encoder: DashengEncoder, size: str, source) -> DashengEncoder:
    if encoder.config != SIZES[size]:
        raise CheckpointError(
            f"{os.fspath(source)}: holds size {size_name(encoder.config) or encoder.config}, not {size!r}"
        )
    return encoder


def dasheng_base(
    path: str | os.PathLike | None = None,
    *,
    pretrained: bool = True,
    map_location: str | torch.device = "cpu",
    weights: str | os.PathLike | None = None,
) -> DashengEncoder:
    """Dasheng base (768-d, 12 blocks, 85.4 M), in eval mode: the RELEASED weights by default.

    ``path``: any model spec (official ``.pt``, Hugging Face folder or repo id, our
    ``.safetensors``; ``"hub"`` for ``mispeech/dasheng-base``); None: the release, found as
    :func:`released` says. ``pretrained=False``: random init (seed 0), no weights read.
    ``weights``: the former name of ``path``. As ``dasheng.dasheng_base(path=None)``.
    """
    return _named("base", path, pretrained, map_location, weights)


def dasheng_06B(
    path: str | os.PathLike | None = None,
    *,
    pretrained: bool = True,
    map_location: str | torch.device = "cpu",
    weights: str | os.PathLike | None = None,
) -> DashengEncoder:
    """Dasheng 0.6B (1280-d, 32 blocks), the released weights by default; as :func:`dasheng_base`."""
    return _named("0.6B", path, pretrained, map_location, weights)


def dasheng_12B(
    path: str | os.PathLike | None = None,
    *,
    pretrained: bool = True,
    map_location: str | torch.device = "cpu",
    weights: str | os.PathLike | None = None,
) -> DashengEncoder:
    """Dasheng 1.2B (1536-d, 40 blocks), the released weights by default; as :func:`dasheng_base`."""
    return _named("1.2B", path, pretrained, map_location, weights)
