"""What ``embed`` writes, and :func:`read_embeddings`, which reads it back as arrays.

``OUT`` (Parquet, zstd), one row per file, sorted by ``path``:

- ``path``: the file's resolved path (absolute, links followed): the key a rerun checks, with
  ``size`` and ``mtime_ns``; ``input``: the path as it was given;
- ``duration_s``, ``chunks`` (10.08 s windows), ``num_frames`` (25 Hz frame embeddings);
- ``embedding``: (D,) float32, the mean of the frames; with ``--frames`` also ``frames_file``;
- ``model``, ``model_sha256``; the file's metadata (key ``dasheng``) holds the model, dtype and
  the provenance (config hash, versions, git SHA).

With ``--frames``, ``OUT.frames/<name>.parquet`` per file (``frames_file``, relative to OUT's
folder): one row per frame, ``time_ms`` (float32, the frame's centre) and ``frame`` (D float32),
written as the file is embedded, a row group every few windows, so a long recording never sits in
memory. Files that cannot be used go to ``OUT.rejects.csv`` (path, reason, size, mtime_ns).
While a run goes, finished rows wait in ``OUT.parts/`` (what an interrupted run keeps).

    from dasheng_pipeline.tools import read_embeddings
    e = read_embeddings("e.parquet")  # also a tuple: paths, clips, frames, meta, table
    e.paths, e.clips.shape, e.frames[0].shape  # resolved paths; (N, D) and (T, D) float32
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dasheng_model.embed import frame_times_ms
from dasheng_pipeline.common import atomic
from dasheng_pipeline.tools import inputs

META_KEY = b"dasheng"
ROW_GROUP_WINDOWS = 16  # windows of frames per row group of a frames file


class EmbedError(ValueError):
    """A run that cannot start or finish (a foreign ``--out``, no usable input …)."""


def schema(dim: int, with_frames: bool) -> pa.Schema:
    fields = [
        pa.field("path", pa.string()),
        pa.field("input", pa.string()),
        pa.field("size", pa.int64()),
        pa.field("mtime_ns", pa.int64()),
        pa.field("duration_s", pa.float64()),
        pa.field("chunks", pa.int32()),
        pa.field("num_frames", pa.int64()),
        pa.field("embedding", pa.list_(pa.float32(), dim)),
    ]
    if with_frames:
        fields.append(pa.field("frames_file", pa.string()))
    return pa.schema(
        fields + [pa.field("model", pa.string()), pa.field("model_sha256", pa.string())]
    )


def frames_schema(dim: int) -> pa.Schema:
    return pa.schema([("time_ms", pa.float32()), ("frame", pa.list_(pa.float32(), dim))])


def rejects_path(out: Path) -> Path:
    return out.with_name(out.stem + ".rejects.csv")


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def frames_dir(out: Path) -> Path:
    return out.with_name(out.name + ".frames")


def frames_name(item: inputs.Item) -> str:
    """A file's frames file, relative to OUT's folder: named after its key, so that a changed
    file gets a new one and a row never points at another version's frames."""
    digest = hashlib.sha256(json.dumps(list(item.key)).encode()).hexdigest()[:24]
    return f"{digest}.parquet"


# -- rejects -----------------------------------------------------------------------------------


def read_rejects(path: Path) -> dict[str, inputs.Reject]:
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as fh:
        return {
            r["path"]: inputs.Reject(r["path"], r["reason"], int(r["size"]), int(r["mtime_ns"]))
            for r in csv.DictReader(fh)
        }


def write_rejects(path: Path, rejects: dict[str, inputs.Reject]) -> None:
    rows = sorted(rejects.values(), key=lambda r: r.path)
    atomic.write_csv(
        path,
        ["path", "reason", "size", "mtime_ns"],
        [[r.path, r.reason, r.size, r.mtime_ns] for r in rows],
    )


# -- the table and its parts -------------------------------------------------------------------


def _ours(path: Path, read):
    """``read(path)`` (a schema or a table) of a Parquet file ``embed`` wrote; else one line that
    names the file."""
    try:
        found = read(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise EmbedError(
            f"{path}: not a Parquet file embed can add to ({exc}); pass another --out"
        ) from exc
    schema_ = found if isinstance(found, pa.Schema) else found.schema
    if META_KEY not in (schema_.metadata or {}):
        raise EmbedError(
            f"{path}: a Parquet file that embed did not write (no '{META_KEY.decode()}' "
            "metadata); pass another --out"
        )
    return found


def _read_checked(path: Path, expected: pa.Schema, frames: bool) -> pa.Table:
    """A table written by ``embed`` with the same layout; else one line that names the file."""
    table = _ours(path, pq.read_table)
    if table.schema.names != expected.names:
        if set(table.schema.names) ^ set(expected.names) == {"frames_file"}:
            how = "without" if frames else "with"
            raise EmbedError(
                f"{path} was written {how} --frames; rerun the same way, or pass another --out"
            )
        raise EmbedError(
            f"{path}: written by another version of embed (columns {table.schema.names}); "
            "pass another --out"
        )
    return table


def check_ours(out: Path) -> None:
    """Refuse, before any work, an ``OUT`` that ``embed`` did not write (its schema only)."""
    if out.is_file():
        _ours(out, pq.read_schema)


def read_tables(out: Path, dim: int, frames: bool) -> list[pa.Table]:
    """OUT and its parts, each checked (:func:`_read_checked`)."""
    expected = schema(dim, frames)
    tables = [_read_checked(out, expected, frames)] if out.is_file() else []
    parts = parts_dir(out)
    if parts.is_dir():
        atomic.clean_stale_temps(parts)
        tables += [_read_checked(p, expected, frames) for p in sorted(parts.glob("part-*.parquet"))]
    return tables


def write_table(table: pa.Table, path: Path, meta: dict) -> None:
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
    with atomic.atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def check_writable(out: Path) -> None:
    """Refuse an ``--out`` that cannot be written, before any work."""
    if out.suffix != ".parquet":
        raise EmbedError(f"--out {out}: expected a .parquet file name")
    if out.is_dir():
        raise EmbedError(f"--out {out}: a folder; expected a .parquet file name")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = atomic.temp_path_for(out)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise EmbedError(
            f"--out {out}: cannot write there ({exc.strerror or exc}); pass a writable path"
        ) from exc


class FramesWriter:
    """One file's frames file, written window by window into a temporary name, committed whole."""

    def __init__(self, path: Path, dim: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.dim = path, dim
        self.tmp = atomic.temp_path_for(path)
        self.writer = pq.ParquetWriter(self.tmp, frames_schema(dim), compression="zstd")
        self.buffer: list[torch.Tensor] = []
        self.written = 0  # frames

    def write(self, frames: torch.Tensor, times_ms: np.ndarray | None = None) -> None:
        """The next frames (n, D); ``times_ms``: their times when not the encoder's 25 Hz ones."""
        if times_ms is not None:
            self._flush()
            self._write(frames.numpy(), np.asarray(times_ms, np.float32))
            return
        self.buffer.append(frames)
        if len(self.buffer) >= ROW_GROUP_WINDOWS:
            self._flush()

    def _flush(self) -> None:
        if not self.buffer:
            return
        frames = torch.cat(self.buffer).numpy()
        self.buffer.clear()
        self._write(frames, frame_times_ms(self.written + frames.shape[0])[self.written :].numpy())

    def _write(self, frames: np.ndarray, times: np.ndarray) -> None:
        flat = pa.array(frames.reshape(-1), type=pa.float32())
        column = pa.FixedSizeListArray.from_arrays(flat, self.dim)
        self.writer.write_table(pa.table([pa.array(times), column], schema=frames_schema(self.dim)))
        self.written += frames.shape[0]

    def commit(self) -> None:
        self._flush()
        self.writer.close()
        atomic.commit(self.tmp, self.path)

    def discard(self) -> None:
        self.writer.close()
        self.tmp.unlink(missing_ok=True)


def remove_orphan_frames(out: Path, table: pa.Table) -> None:
    """Frames files that no row of OUT names (older versions of changed files, interrupted runs)."""
    folder = frames_dir(out)
    if not folder.is_dir():
        return
    atomic.clean_stale_temps(folder)
    named = (
        set(table.column("frames_file").to_pylist())
        if "frames_file" in table.schema.names
        else set()
    )
    for entry in folder.glob("*.parquet"):
        if f"{folder.name}/{entry.name}" not in named:
            entry.unlink(missing_ok=True)


# -- reading it back ---------------------------------------------------------------------------


class Frames(Sequence):
    """The frame embeddings of each row, read from its frames file when asked for: ``frames[i]``
    is (T_i, D) float32 (a read-only view of Arrow's buffer: ``.copy()`` for a writable one),
    ``frames.times_ms(i)`` their centres in milliseconds."""

    def __init__(self, folder: Path, names: list[str | None], dim: int):
        self.folder, self.names, self.dim = folder, names, dim

    def __len__(self) -> int:
        return len(self.names)

    def _column(self, i: int, column: str) -> pa.Array:
        if self.names[i] is None:
            raise EmbedError(f"row {i}: no frames stored (embed ran without --frames)")
        return pq.read_table(self.folder / self.names[i], columns=[column]).column(column)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        flat = self._column(i, "frame").combine_chunks().flatten()
        return flat.to_numpy(zero_copy_only=False).reshape(-1, self.dim)

    def times_ms(self, i: int) -> np.ndarray:
        return self._column(i, "time_ms").to_numpy()


class Embedded(NamedTuple):
    """What :func:`read_embeddings` returns (a tuple: ``paths, clips, frames, meta = ...``)."""

    paths: list[str]  # resolved paths, OUT's order (sorted)
    clips: np.ndarray  # (N, D) float32: one embedding per file (read-only, as Arrow's frames)
    frames: Frames | None  # per file (T_i, D) float32, read on demand; None without --frames
    meta: dict  # model, model_sha256, dtype, provenance …
    table: pa.Table  # every column (input, duration_s, num_frames …)


def read_embeddings(path: str | os.PathLike) -> Embedded:
    """An ``embed`` output → its paths, its clip embeddings as one (N, D) array, its frames per
    file (with ``--frames``) and its metadata; see the module docstring for an example."""
    path = Path(path)
    table = pq.read_table(path)
    meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
    dim = table.schema.field("embedding").type.list_size
    clips = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    clips = clips.reshape(table.num_rows, dim).astype(np.float32, copy=False)
    frames = None
    if "frames_file" in table.schema.names:
        frames = Frames(path.parent, table.column("frames_file").to_pylist(), dim)
    return Embedded(table.column("path").to_pylist(), clips, frames, meta, table)
