"""Corpora with an ID list and several routes, and the key tables of sources.

A *corpus* (config section ``corpora``) has an ID list (e.g. AudioSet's official segment CSV) and
*routes*: sources tried in order, e.g. ``[a Hugging Face mirror, youtube]``. Each ID is taken
from the first route that has it; a later route only fetches what the earlier ones did not
obtain, so nothing is fetched twice. The ID list is frozen: items of a mirror that the list does
not hold are rejected ("not listed"), so everyone trains and evaluates on the same IDs.

Jobs (``python -m dasheng_pipeline.sources.routes ...``):

``ids``      the ID list → ``corpora/<corpus>/ids.parquet`` (id, 64-bit hash, labels, row).
``keys``     a source's chunk manifests → ``keys/<source>.parquet``: the first usable copy of each
             key (the winner) and every later copy (a duplicate, with where the first one was).
             A mirror's mel jobs reject the later copies (:func:`resolve_clips`); a corpus's later
             routes skip the IDs its winners hold.

IDs are matched through 64-bit hashes (blake2b): a set of 2 M IDs is 16 MB, loaded in
milliseconds by every chunk job.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dasheng_pipeline.common import atomic, logs, manifest, provenance
from dasheng_pipeline.sources import lists

log = logging.getLogger(__name__)

ID_FORMATS = (*lists.FORMATS, "ids", "jamendo")


# --------------------------------------------------------------------------- IDs and sets


def key_hash(key: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little"
    )


def hash_array(keys: Iterable[str]) -> np.ndarray:
    return np.fromiter((key_hash(k) for k in keys), dtype=np.uint64)


class IdSet:
    """A set of IDs held as sorted 64-bit hashes."""

    def __init__(self, hashes: np.ndarray | None = None):
        self.hashes = np.unique(np.asarray(hashes if hashes is not None else [], dtype=np.uint64))

    def __len__(self) -> int:
        return int(self.hashes.size)

    def __contains__(self, key: str) -> bool:
        h = np.uint64(key_hash(key))
        i = int(np.searchsorted(self.hashes, h))
        return i < self.hashes.size and self.hashes[i] == h

    @classmethod
    def from_tables(cls, paths: Iterable[str | Path], winners_only: bool = True) -> IdSet:
        """The IDs of ``ids.parquet`` or key tables (their winners: the obtained IDs)."""
        import pyarrow.parquet as pq

        parts = []
        for path in paths:
            table = pq.read_table(path, columns=["hash", "winner"] if winners_only else ["hash"])
            if winners_only:
                table = table.filter(table.column("winner"))
            parts.append(table.column("hash").to_numpy())
        return cls(np.concatenate(parts) if parts else None)


def corpus_id(seg: lists.Segment, fmt: str) -> str:
    """The ID of a segment-list row, as the corpus's mirrors name it: AudioSet's YouTube ID (one
    segment per video), VGGSound's ``<ytid>_<start, 6 digits>`` (its files' names), else the
    YouTube source's own ``<ytid>_<start ms>``."""
    if fmt == "audioset":
        return seg.ytid
    if fmt == "vggsound":
        return f"{seg.ytid}_{int(seg.start_s):06d}"
    return seg.clip_id


@dataclass
class Listed:
    id: str
    row: int
    labels: list[str]
    error: str = ""


def read_id_list(path: str | Path, fmt: str, segment_s: float = 10.0) -> list[Listed]:
    """The rows of an ID list. Formats: the segment lists' (audioset, vggsound, acav100m);
    ``ids``: one ID per line, optionally ``,label;label``; ``jamendo``: MTG-Jamendo's TSV
    (header TRACK_ID, ARTIST_ID, ALBUM_ID, PATH, DURATION, TAGS...; the ID is PATH without its
    extension, as in the release's tar files)."""
    if fmt in lists.FORMATS:
        return _segment_rows(path, fmt, segment_s)
    if fmt == "jamendo":
        return _jamendo_rows(path)
    if fmt == "ids":
        return _plain_rows(path)
    raise ValueError(f"unknown ID list format {fmt!r}; expected one of {ID_FORMATS}")


def _segment_rows(path, fmt: str, segment_s: float) -> list[Listed]:
    out = []
    for row, (_, line, content) in enumerate(lists.iter_rows(path)):
        seg = lists.parse_row(fmt, row, line, content, segment_s)
        if seg is None:
            continue
        ident = corpus_id(seg, fmt) if not seg.error else f"row{row}"
        out.append(Listed(ident, row, seg.labels, seg.error))
    return out


def _plain_rows(path) -> list[Listed]:
    out = []
    for row, (_, _, content) in enumerate(lists.iter_rows(path)):
        text = content.decode("utf-8", "replace").strip()
        ident, _, labels = text.partition(",")
        ident = ident.strip()
        error = "" if ident and not re.search(r"\s", ident) else f"{ident!r} is not an ID"
        out.append(Listed(ident or f"row{row}", row, [x for x in labels.split(";") if x], error))
    return out


def _jamendo_rows(path) -> list[Listed]:
    out = []
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        header = next(reader, [])
        if "PATH" not in header:
            raise ValueError(f"{path}: not an MTG-Jamendo TSV (no PATH column in {header[:6]})")
        where = header.index("PATH")
        for row, fields in enumerate(reader):
            if len(fields) <= where or not fields[where].strip():
                out.append(Listed(f"row{row}", row, [], "no PATH field"))
                continue
            ident = fields[where].strip().rsplit(".", 1)[0]
            out.append(Listed(ident, row, [t for t in fields[len(header) - 1 :] if t]))
    return out


def write_ids(list_path: str, fmt: str, segment_s: float, out: str, params: dict) -> dict:
    """The ``ids`` job: valid, distinct IDs of the list as a Parquet table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = read_id_list(list_path, fmt, segment_s)
    seen: set[str] = set()
    good, invalid, repeated = [], 0, 0
    for r in rows:
        if r.error:
            invalid += 1
        elif r.id in seen:
            repeated += 1
        else:
            seen.add(r.id)
            good.append(r)
    table = pa.table(
        {
            "id": pa.array([r.id for r in good], pa.string()),
            "hash": pa.array(hash_array(r.id for r in good), pa.uint64()),
            "labels": pa.array([r.labels for r in good], pa.list_(pa.string())),
            "row": pa.array([r.row for r in good], pa.int64()),
        }
    )
    info = {
        "list": list_path,
        "list_sha256": atomic.sha256_file(list_path),
        "rows": len(rows),
        "listed": len(good),
        "invalid": invalid,
        "repeated": repeated,
        "provenance": provenance.stamp(params, params.get("seed")),
    }
    table = table.replace_schema_metadata({b"dasheng": json.dumps(info, sort_keys=True).encode()})
    with atomic.atomic_path(out) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    log.info(
        f"{list_path}: {len(rows)} rows, {len(good)} IDs listed, {invalid} invalid, "
        f"{repeated} repeated"
    )
    return info


def read_ids_info(path: str | Path) -> dict:
    import pyarrow.parquet as pq

    return json.loads(pq.read_schema(path).metadata[b"dasheng"])


# --------------------------------------------------------------------------- key tables


def build_keys(manifest_paths: list[str], out: str, params: dict) -> dict:
    """The ``keys`` job: over a source's chunk manifests in chunk order, the first ok copy of
    each clip ID wins; a later ok copy is a duplicate (recorded with where the first one is)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    first: dict[str, tuple[str, str]] = {}
    cols = {k: [] for k in ("id", "chunk", "position", "winner", "first_chunk", "first_origin")}
    for path in manifest_paths:
        doc = manifest.read(path)
        for pos, clip in enumerate(doc["clips"]):
            if clip["status"] != "ok":
                continue
            cid = clip["clip_id"]
            origin = clip.get("origin", "")
            won = cid not in first
            if won:
                first[cid] = (doc["chunk"], origin)
            for key, value in zip(
                cols, (cid, doc["chunk"], pos, won, first[cid][0], first[cid][1])
            ):
                cols[key].append(value)
    table = pa.table(
        {
            "id": pa.array(cols["id"], pa.string()),
            "hash": pa.array(hash_array(cols["id"]), pa.uint64()),
            "chunk": pa.array(cols["chunk"], pa.string()),
            "position": pa.array(cols["position"], pa.int64()),
            "winner": pa.array(cols["winner"], pa.bool_()),
            "first_chunk": pa.array(cols["first_chunk"], pa.string()),
            "first_origin": pa.array(cols["first_origin"], pa.string()),
        }
    )
    stamp = provenance.stamp(params, params.get("seed"))
    table = table.replace_schema_metadata({b"dasheng": json.dumps(stamp, sort_keys=True).encode()})
    with atomic.atomic_path(out) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    dups = len(cols["id"]) - len(first)
    log.info(f"{params['source']}: {len(first)} distinct keys obtained, {dups} duplicates")
    return {"keys": len(first), "duplicates": dups}


def resolve_clips(doc: dict, keys_path: str | Path) -> list[dict]:
    """A mirror chunk's clips with every later copy of a key rejected ("duplicate", naming the
    chunk of the first copy): the mel job applies this to a mirror's chunk manifest, the coverage
    report too."""
    import pyarrow.parquet as pq

    table = pq.read_table(
        keys_path,
        filters=[("chunk", "=", doc["chunk"]), ("winner", "=", False)],
        columns=["position", "first_chunk", "first_origin"],
    ).to_pylist()
    dups = {r["position"]: r for r in table}
    clips = []
    for pos, clip in enumerate(doc["clips"]):
        if pos in dups:
            d = dups[pos]
            where = f"chunk {d['first_chunk']}" + (
                f" ({d['first_origin']})" if d["first_origin"] else ""
            )
            keep = {k: clip[k] for k in ("key", "origin", "labels") if k in clip}
            clip = manifest.clip(
                clip["clip_id"],
                "rejected",
                f"duplicate: key {clip['clip_id']!r} was already obtained in {where}",
                reason_class="duplicate",
                **keep,
            )
        clips.append(clip)
    return clips


def read_listing(path: str | Path) -> list[str]:
    """The manifests a key table reads (the ``source_manifests`` job's list, one per line)."""
    return [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line]


# --------------------------------------------------------------------------- jobs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dasheng_pipeline.sources.routes", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ids = sub.add_parser("ids", help="a corpus's ID list as a Parquet table")
    ids.add_argument("--list", required=True)
    ids.add_argument("--params", required=True, help="JSON: corpus, corpus_cfg, seed")
    ids.add_argument("--out", required=True)
    keys = sub.add_parser("keys", help="a source's key table (winners and duplicates)")
    keys.add_argument("--params", required=True, help="JSON: source, seed")
    keys.add_argument("--listing", required=True, help="the chunk manifests, one per line")
    keys.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logs.setup()
    if args.command == "ids":
        params = json.loads(args.params)
        cfg = params["corpus_cfg"]
        write_ids(args.list, cfg["format"], float(cfg["segment_s"]), args.out, params)
    else:
        build_keys(read_listing(args.listing), args.out, json.loads(args.params))


if __name__ == "__main__":
    main()
