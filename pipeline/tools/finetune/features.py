"""What the trainers take: clip embeddings from the shared embedding cache (frozen modes), or the
log-mels in memory (full mode). An example whose file cannot be decoded moves to the rejects.

The cache: ``<root>/embeddings/<key>/embeddings.parquet``, written by ``embed`` itself
(:func:`dasheng_pipeline.tools.embed.embed_files`: its windows and batcher, format and resume
rules), ``<root>`` = ``cache_dir``, else ``$DASHENG_CACHE_DIR``, else
``$XDG_CACHE_HOME/dasheng-pipeline`` (``~/.cache/dasheng-pipeline``). The key hashes what the
embeddings depend on: every file's resolved path, size and modification time in DATA's order,
the weights' sha256, dtype, device type, batch size and window. Runs that share a key take turns
(``flock`` on the folder's ``.lock``); every file in it is written atomically. The full mode's
log-mels go through the same windows and batcher (``Model.frames``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from dasheng_model.windows import WINDOW_FRAMES
from dasheng_pipeline.common import atomic
from dasheng_pipeline.tools import inputs
from dasheng_pipeline.tools.embed import (
    MissingInputs,
    Model,
    NothingEmbedded,
    embed_files,
    read_embeddings,
    read_rejects,
    rejects_path,
)
from dasheng_pipeline.tools.finetune.data import Data, FinetuneError

log = logging.getLogger(__name__)

ENV = "DASHENG_CACHE_DIR"
FORMAT = 2  # what a cache folder holds; a change here gives new keys (2: embed's resolved paths)
TABLE = "embeddings.parquet"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache's root: ``cache_dir``, else ``$DASHENG_CACHE_DIR``, else the XDG cache folder."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "dasheng-pipeline"


def cache_key(files: list[inputs.Item], model: Model, batch_size: int) -> tuple[str, dict]:
    """(key, what it hashes but the file list): the same key means the same embeddings' bytes."""
    settings = {
        "format": FORMAT,
        "model_sha256": model.sha256,
        "dtype": model.dtype,
        "device": model.device.type,
        "batch_size": batch_size,
        "window_frames": WINDOW_FRAMES,
    }
    listing = [[i.real, i.size, i.mtime_ns] for i in files]
    files_sha256 = hashlib.sha256(atomic.canonical_json(listing).encode()).hexdigest()
    about = {**settings, "files": len(files), "files_sha256": files_sha256}
    return hashlib.sha256(atomic.canonical_json(about).encode()).hexdigest()[:32], about


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold ``folder/.lock`` exclusively (``flock``; waits for a run that holds it)."""
    with open(folder / ".lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info(f"{folder}: another run is filling this embedding cache; waiting for it")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass
class CacheUse:
    folder: Path
    embedded: int  # files embedded by this run
    cached: int  # files the cache answered (rows or rejects of an earlier run)


def _open_folder(data: Data, model: Model, batch_size: int, cache_dir) -> Path:
    key, about = cache_key([e.item for e in data.examples], model, batch_size)
    folder = cache_root(cache_dir) / "embeddings" / key
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FinetuneError(
            f"embedding cache {folder}: cannot create it ({exc.strerror or exc}); "
            f"set {ENV} to a writable folder"
        ) from exc
    if not (folder / "key.json").is_file():
        atomic.write_json(folder / "key.json", {**about, "model": model.spec})
    return folder


def _take(table: pa.Table | None, data: Data, failed: dict[str, inputs.Reject]) -> np.ndarray:
    """The rows of ``data.examples`` in order (n, D) float32; the examples without a row move
    to ``data.rejects`` with the reason the cache gives (no table: no file could be embedded)."""
    columns = ("path", "size", "mtime_ns")
    keys = zip(*(table.column(c).to_pylist() for c in columns)) if table is not None else []
    rows = {key: i for i, key in enumerate(keys)}
    keep, take = [], []
    for e in data.examples:
        row = rows.get(e.item.key)
        if row is None:
            path = e.item.real
            reason = failed[path].reason if path in failed else "not embedded"
            data.rejects.append((e.item.path, reason))
        else:
            keep.append(e)
            take.append(row)
    data.examples = keep
    if not take:
        return np.zeros((0, 0), np.float32)
    emb = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return emb.reshape(table.num_rows, -1)[take].astype(np.float32)


def frozen_features(
    data: Data, model: Model, batch_size: int, progress: bool, cache_dir=None
) -> tuple[np.ndarray, CacheUse]:
    """Clip embeddings (n, D) float32 of ``data.examples`` (those that fail move to the rejects),
    from the shared cache, embedding what it lacks."""
    folder = _open_folder(data, model, batch_size, cache_dir)
    table_path = folder / TABLE
    with locked(folder):
        try:
            summary = embed_files(
                [e.item.real for e in data.examples],
                model,
                table_path,
                batch_size=batch_size,
                device=str(model.device),
                dtype=model.dtype,
                progress=progress,
            )
        except (NothingEmbedded, MissingInputs) as exc:  # those examples move to the rejects
            summary = exc.summary
        table = read_embeddings(table_path).table if table_path.is_file() else None
        failed = read_rejects(rejects_path(table_path))
    use = CacheUse(folder, summary.embedded, summary.skipped)
    log.info(f"embeddings: {use.embedded} files embedded, {use.cached} from the cache {folder}")
    return _take(table, data, failed), use


def mels(data: Data, model: Model, progress: bool) -> list[torch.Tensor]:
    """The dB log-mel (64, T) of every example (in memory); failures move to ``data.rejects``."""
    keep, out = [], []
    by_item = {e.item: e for e in data.examples}
    for item, samples, reason in inputs.load_all(
        [e.item for e in data.examples], progress=progress
    ):
        if samples is None:
            data.rejects.append((item.path, reason))
        else:
            keep.append(by_item[item])
            out.append(model.mel(samples))
    data.examples = keep
    return out
