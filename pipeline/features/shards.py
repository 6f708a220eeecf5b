"""The log-mel Parquet shard format: schema, writers, reader, verification and the dataset
manifest that lists every shard. A chunk's rows go to ``shards/<source>/<chunk>/part-NNN.parquet``
files of at most ``shards.max_rows`` rows each.

One row per 10 s window::

    clip_id       string
    source        string (dictionary)
    window        int32    window index within the clip
    start_s       float64  window start within the clip (s)
    valid_frames  int32    frames holding audio; the rest is padding
    labels        list<string>
    mel           fixed_shape_tensor<float16, [n_mels, frames]>  dB log-mel (before init_bn)

The mel column is stored uncompressed and without statistics (dB values barely compress and
reading must be fast); the other columns use the configured codec. The schema metadata key
``dasheng`` holds JSON with the mel parameters, the provenance stamp and the format version.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dasheng_pipeline.common import atomic, logs, manifest, provenance

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_KEY = b"dasheng"
SMALL_COLUMNS = ("clip_id", "source", "window", "start_s", "valid_frames", "labels")


class ShardError(ValueError):
    """A shard is missing, damaged, or does not match what the reader expects."""


def schema(n_mels: int, frames: int, meta: dict) -> pa.Schema:
    return pa.schema(
        [
            ("clip_id", pa.string()),
            ("source", pa.string()),
            ("window", pa.int32()),
            ("start_s", pa.float64()),
            ("valid_frames", pa.int32()),
            ("labels", pa.list_(pa.string())),
            ("mel", pa.fixed_shape_tensor(pa.float16(), [n_mels, frames])),
        ],
        metadata={META_KEY: provenance.canonical_json(meta).encode()},
    )


class ShardWriter:
    """Writes rows in row groups of ``row_group_size`` to a temporary file; ``close()``
    returns (rows, sha256, bytes) and renames it to ``path``. Abort leaves nothing behind."""

    def __init__(
        self,
        path: str | Path,
        n_mels: int,
        frames: int,
        meta: dict,
        row_group_size: int,
        compression: str,
    ):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = atomic.temp_path_for(self.path)
        self.schema = schema(n_mels, frames, meta)
        self.shape = (n_mels, frames)
        self.row_group_size = row_group_size
        codec = "NONE" if compression == "none" else compression.upper()
        # Column paths as Parquet names them (list columns have a ".list.element" leaf).
        small = [c if c != "labels" else "labels.list.element" for c in SMALL_COLUMNS]
        self.writer = pq.ParquetWriter(
            self.tmp,
            self.schema,
            compression={**{c: codec for c in small}, "mel.list.element": "NONE"},
            use_dictionary=["source", "labels.list.element"],
            write_statistics=small,
            data_page_size=1 << 20,
        )
        self.pending: list[dict] = []
        self.rows = 0

    def add(
        self,
        clip_id: str,
        source: str,
        window: int,
        start_s: float,
        valid_frames: int,
        labels: list[str],
        mel: np.ndarray,
    ) -> None:
        if mel.shape != self.shape:
            raise ShardError(
                f"mel of {clip_id} window {window} has shape {mel.shape}, expected {self.shape}"
            )
        self.pending.append(
            {
                "clip_id": clip_id,
                "source": source,
                "window": window,
                "start_s": start_s,
                "valid_frames": valid_frames,
                "labels": labels,
                "mel": np.ascontiguousarray(mel, dtype=np.float16),
            }
        )
        if len(self.pending) >= self.row_group_size:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        rows = self.pending
        mel = pa.FixedShapeTensorArray.from_numpy_ndarray(
            np.ascontiguousarray(np.stack([r["mel"] for r in rows]))
        )
        columns = [
            pa.array([r[name] for r in rows], type=self.schema.field(name).type)
            for name in SMALL_COLUMNS
        ]
        table = pa.Table.from_arrays([*columns, mel], schema=self.schema)
        self.writer.write_table(table, row_group_size=self.row_group_size)
        self.rows += len(rows)
        self.pending = []

    def close(self) -> tuple[int, str, int]:
        self._flush()
        self.writer.close()
        digest = atomic.sha256_file(self.tmp)
        size = self.tmp.stat().st_size
        atomic.commit(self.tmp, self.path)
        return self.rows, digest, size

    def abort(self) -> None:
        try:
            self.writer.close()
        finally:
            self.tmp.unlink(missing_ok=True)


class PartWriter:
    """A chunk's rows as consecutive shard files ``<folder>/part-000.parquet``, ... of at most
    ``max_rows`` rows each (a few hundred MB), whatever the chunk's size. ``close()`` returns one
    entry per part: path, rows, clips, sha256, bytes."""

    def __init__(
        self,
        folder: str | Path,
        n_mels: int,
        frames: int,
        meta: dict,
        row_group_size: int,
        compression: str,
        max_rows: int,
    ):
        self.folder = Path(folder)
        self.args = (n_mels, frames, meta, row_group_size, compression)
        self.max_rows = max_rows
        self.parts: list[dict] = []
        self.current: ShardWriter | None = None
        self.count = 0
        self.clips: set[str] = set()

    def add(self, clip_id: str, *row) -> None:
        if self.current is None or self.count == self.max_rows:
            self._finish()
            self.current = ShardWriter(
                self.folder / f"part-{len(self.parts):03d}.parquet", *self.args
            )
        self.current.add(clip_id, *row)
        self.count += 1
        self.clips.add(clip_id)

    def _finish(self) -> None:
        if self.current is None:
            return
        rows, digest, size = self.current.close()
        self.parts.append(
            {
                "path": str(self.current.path),
                "rows": rows,
                "clips": len(self.clips),
                "sha256": digest,
                "bytes": size,
            }
        )
        self.current, self.count, self.clips = None, 0, set()

    def close(self) -> list[dict]:
        if not self.parts and self.current is None:  # an empty chunk still gets one (empty) part
            self.current = ShardWriter(self.folder / "part-000.parquet", *self.args)
        self._finish()
        return self.parts

    def abort(self) -> None:
        if self.current is not None:
            self.current.abort()
        for part in self.parts:
            Path(part["path"]).unlink(missing_ok=True)


def read_meta(path: str | Path) -> dict:
    """The ``dasheng`` metadata of a shard (mel parameters, provenance, format version)."""
    try:
        sch = pq.read_schema(path)
    except FileNotFoundError:
        raise ShardError(f"{path}: shard missing") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise ShardError(f"{path}: not a readable Parquet file ({exc}); rebuild it") from None
    raw = (sch.metadata or {}).get(META_KEY)
    if raw is None:
        raise ShardError(
            f"{path}: no '{META_KEY.decode()}' schema metadata: not a shard of this pipeline"
        )
    missing = [n for n in (*SMALL_COLUMNS, "mel") if n not in sch.names]
    if missing:
        raise ShardError(f"{path}: wrong schema, missing column(s) {missing}")
    meta = json.loads(raw)
    mel = meta.get("mel") or {}
    if {"n_mels", "window_s", "sample_rate", "hop_length"} <= set(mel):
        # Column types too: a mel column of another shape or dtype would only fail (or worse, train)
        # deep inside the training workers.
        frames = int(round(mel["window_s"] * mel["sample_rate"])) // mel["hop_length"] + 1
        expected = schema(int(mel["n_mels"]), frames, {})
        wrong = [
            f"{f.name} is {sch.field(f.name).type}, expected {f.type}"
            for f in expected
            if not sch.field(f.name).type.equals(f.type)
        ]
        if wrong:
            raise ShardError(f"{path}: wrong schema: {'; '.join(wrong)}")
    return meta


def verify(path: str | Path, sha256: str) -> None:
    """Raise :class:`ShardError` naming the file when its bytes do not match the manifest."""
    try:
        actual = atomic.sha256_file(path)
    except FileNotFoundError:
        raise ShardError(
            f"{path}: shard listed in the dataset manifest is missing; rerun its mel rule"
        ) from None
    if actual != sha256:
        raise ShardError(
            f"{path}: sha256 {actual[:16]}... does not match the manifest's {sha256[:16]}...: "
            "the shard is damaged or was changed; delete it and rerun its mel rule"
        )


def quarantine(shard_path: str | Path) -> Path:
    """Move a damaged shard's chunk outputs (its folder of parts and its shard manifest) into
    ``shards/<source>/.damaged/``, so that rerunning Snakemake rebuilds exactly that chunk."""
    folder = Path(shard_path).parent
    damaged = folder.parent / ".damaged"
    damaged.mkdir(exist_ok=True)
    for item in (folder, folder.with_suffix(".json")):
        target = damaged / item.name
        if target.is_dir():
            shutil.rmtree(target)
        if item.exists():
            os.replace(item, target)
    return damaged / folder.name


def verify_all(entries: list[dict], root: str | Path = ".") -> None:
    """Check every shard of a dataset (entries with path and sha256). Damaged or missing shards
    are moved aside (:func:`quarantine`) and reported together in one :class:`ShardError`."""
    problems = []
    for entry in entries:
        path = Path(root) / entry["path"]
        try:
            verify(path, entry["sha256"])
        except ShardError as exc:
            if path.parent.is_dir():  # a deleted part too: its chunk must be rebuilt whole
                quarantine(path)
            problems.append(str(exc))
    if problems:
        raise ShardError(
            f"{len(problems)} shard(s) failed their check and were moved to .damaged/; "
            "run snakemake again to rebuild them (rule mel_chunk):\n  " + "\n  ".join(problems)
        )


def iter_batches(
    path: str | Path,
    batch_size: int = 64,
    columns: tuple[str, ...] = ("mel", "valid_frames"),
    row_groups: list[int] | None = None,
) -> Iterator[dict]:
    """Stream a shard as dicts of numpy arrays (mel as float16 [B, n_mels, frames])."""
    pf = pq.ParquetFile(path)
    for batch in pf.iter_batches(
        batch_size=batch_size, columns=list(columns), row_groups=row_groups, use_threads=False
    ):
        out = {}
        for name in columns:
            col = batch.column(name)
            if name == "mel":
                out[name] = col.to_numpy_ndarray()
            elif pa.types.is_list(col.type) or pa.types.is_string(col.type):
                out[name] = col.to_pylist()
            else:
                out[name] = col.to_numpy()
        yield out


# --------------------------------------------------------------------------- dataset manifest


def combine_stats(parts: list[dict], n_mels: int) -> dict:
    """Per-mel-bin mean and std over the valid frames of all shards."""
    frames = sum(p["frames"] for p in parts)
    total = np.zeros(n_mels)
    total_sq = np.zeros(n_mels)
    for p in parts:
        total += np.asarray(p["sum"], dtype=np.float64)
        total_sq += np.asarray(p["sumsq"], dtype=np.float64)
    if frames == 0:
        return {"frames": 0, "mean": [0.0] * n_mels, "std": [0.0] * n_mels}
    mean = total / frames
    std = np.sqrt(np.maximum(total_sq / frames - mean**2, 0.0))
    return {
        "frames": int(frames),
        "mean": [round(float(v), 6) for v in mean],
        "std": [round(float(v), 6) for v in std],
    }


def _tally(doc: dict, shards: list, rejects: list, totals: dict) -> None:
    """One shard manifest into the dataset's shard list, rejects and totals."""
    for i, part in enumerate(doc["shards"]):
        shards.append({**part, "source": doc["source"], "chunk": doc["chunk"], "part": i})
    for c in doc["clips"]:
        totals["clips"] += 1
        totals[c["status"]] += 1
        if c["status"] != "ok":
            rejects.append(
                {
                    "source": doc["source"],
                    "chunk": doc["chunk"],
                    "clip_id": c["clip_id"],
                    "status": c["status"],
                    "stage": c.get("stage", "mel"),
                    "reason": c["reason"],
                }
            )
    totals["windows"] += doc["rows"]
    totals["bytes"] += sum(part["bytes"] for part in doc["shards"])
    totals["hours"] += (
        doc["stats"]["frames"] * doc["mel"]["hop_length"] / doc["mel"]["sample_rate"] / 3600
    )


def build_dataset_manifest(
    shard_manifests: list[str], params: dict, out: str, rejects_out: str
) -> dict:
    """Aggregate the shard manifests; with ``shards.verify`` every part is checked against the
    sha256 its mel job recorded first (a damaged one is moved aside, naming the file)."""
    shards, rejects, stats = [], [], []
    totals = {
        "clips": 0,
        "ok": 0,
        "failed": 0,
        "rejected": 0,
        "windows": 0,
        "hours": 0.0,
        "bytes": 0,
    }
    mel_params = None
    for path in shard_manifests:
        doc = manifest.read(path)
        if mel_params is None:
            mel_params = doc["mel"]
        elif doc["mel"] != mel_params:
            raise ShardError(
                f"{path}: mel parameters {doc['mel']} differ from the other shards' {mel_params}"
            )
        stats.append(doc["stats"])
        _tally(doc, shards, rejects, totals)
    if params["shards"]["verify"]:
        verify_all(shards)
    totals["hours"] = round(totals["hours"], 6)
    n_mels = mel_params["n_mels"] if mel_params else 0
    stamp = provenance.stamp(params, params.get("seed"))
    doc = {
        "format_version": FORMAT_VERSION,
        "mel": mel_params,
        "shards": shards,
        "totals": totals,
        "stats": combine_stats(stats, n_mels),
        "provenance": stamp,
    }
    atomic.write_json(out, doc)
    atomic.write_json(rejects_out, {"rejects": rejects, "count": len(rejects), "provenance": stamp})
    log.info(
        f"dataset: {len(shards)} shards, {totals['windows']} windows ({totals['hours']:.3f} h of audio), "
        f"clips ok {totals['ok']} / failed {totals['failed']} / rejected {totals['rejected']}"
    )
    return doc


def load_dataset_manifest(path: str | Path) -> dict:
    try:
        with open(path) as fh:
            doc = json.load(fh)
    except FileNotFoundError:
        raise ShardError(f"{path}: dataset manifest missing; run the data stage first") from None
    if doc.get("format_version") != FORMAT_VERSION:
        raise ShardError(
            f"{path}: dataset manifest format {doc.get('format_version')} is not {FORMAT_VERSION}"
        )
    return doc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dasheng_pipeline.features.shards",
        description="check every shard of a dataset manifest against its sha256 (a damaged one is moved "
        "to .damaged/ and named; rerun snakemake to rebuild it)",
    )
    parser.add_argument(
        "manifest", help="dataset manifest (JSON) written by the dataset_manifest rule"
    )
    args = parser.parse_args(argv)
    logs.setup()
    try:
        doc = load_dataset_manifest(args.manifest)
        verify_all(doc["shards"])
    except ShardError as exc:
        raise SystemExit(f"error: {exc}") from None
    log.info(f"{len(doc['shards'])} shards verified")


if __name__ == "__main__":
    main()
