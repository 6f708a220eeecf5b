"""The chunk job shared by the mirror sources (``hf_parquet``, ``webdataset``, ``http_archive``).

A reader yields the chunk's *items* (a Parquet row, a tar sample) and *problems* (a file that could
not be fetched or read to its end). For every item, in order:

* its ID: the source's key, through ``id_regex`` when set (the ID is the shards' ``clip_id``);
* in a corpus: rejected when the corpus's ID list does not hold it ("not listed"), skipped (not
  decoded, not in the manifest, only counted) when an earlier route obtained it;
* rejected when the chunk already had it ("duplicate"; across chunks: the ``resolve`` job);
* reused when an earlier run of the chunk stored it (a killed job resumes where it stopped);
* otherwise decoded through ffmpeg from memory (stdin; MP4-family containers, which need seeking,
  from a temporary file), checked against the ``audio`` rules and stored as 16 kHz mono FLAC;
  without ``audio.keep_audio``, stored as the bytes came (as the YouTube source keeps downloads),
  and the mel step decodes and checks them.

Decodes run ``audio.decode_threads`` at a time; manifest rows keep the reader's order and do not
depend on whether a clip was decoded now or by an earlier, killed run.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import contextlib
import json
import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dasheng_pipeline.common import atomic, audio, logs, manifest
from dasheng_pipeline.sources import routes

log = logging.getLogger(__name__)

# Containers whose index may sit at the end of the file: ffmpeg must seek, which a pipe cannot.
NEEDS_SEEK = {"mp4", "m4a", "m4v", "mov", "3gp", "3g2", "mj2"}


@dataclass
class Item:
    """One candidate clip of a mirror."""

    key: str  # the source's own key (the ID column's value, the tar sample's key)
    origin: str  # where it is (file and row or member), relative to the mirror's root
    data: bytes | None = None  # the encoded audio
    ext: str = ""  # the encoded audio's file extension (lower case, no dot)
    labels: list[str] = field(default_factory=list)
    error: str = ""  # set: the item is rejected with this reason ("<class>: <details>")


@dataclass
class Problem:
    """A whole file of the chunk that could not be used (its items are unknown)."""

    name: str
    status: str  # failed (a rerun retries) or rejected (bad input)
    reason: str  # "<class>: <details>"


@dataclass
class Context:
    """What a chunk job knows besides its items."""

    source: str
    dest: Path
    rules: audio.ClipRules
    threads: int = 1
    keep_audio: bool = True
    id_regex: re.Pattern | None = None
    corpus: str | None = None
    listed: routes.IdSet | None = None  # the corpus's ID list
    earlier: routes.IdSet | None = None  # IDs obtained by the corpus's earlier routes
    skipped: collections.Counter = field(default_factory=collections.Counter)
    unsynced: list[Path] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_params(cls, params: dict, dest: Path) -> Context:
        src = params["source_cfg"]
        route = params.get("route") or {}
        return cls(
            source=params["source"],
            dest=dest,
            rules=audio.ClipRules.from_config(params["audio"]),
            threads=int(params["audio"]["decode_threads"]),
            keep_audio=bool(params["audio"]["keep_audio"]),
            id_regex=re.compile(src["id_regex"]) if src.get("id_regex") else None,
            corpus=route.get("corpus"),
            listed=routes.IdSet.from_tables([route["ids"]], False) if route.get("ids") else None,
            earlier=routes.IdSet.from_tables(route.get("earlier", [])) if route else None,
        )

    def clip_id(self, key: str) -> str | None:
        if self.id_regex is None:
            return key
        m = self.id_regex.search(key)
        if not m:
            return None
        if "id" in self.id_regex.groupindex:
            return m.group("id")
        return m.group(1) if self.id_regex.groups else m.group(0)


def sniff_ext(data: bytes | None, name: str = "") -> str:
    """The encoded format's extension: from ``name`` when it has one, else from magic bytes
    (only to tell MP4-family containers, which need a seekable input, from the rest)."""
    ext = name.rsplit(".", 1)[-1].lower() if "." in name.rsplit("/", 1)[-1] else ""
    if ext:
        return ext
    if data and data[4:8] == b"ftyp":
        return "mp4"
    return ""


def reason_class(reason: str) -> str:
    return reason.split(":", 1)[0].strip() if ":" in reason else reason


def _reject(cid: str, reason: str, item: Item, **extra) -> dict:
    keep = {"origin": item.origin, "labels": item.labels}
    if item.key != cid:
        keep["key"] = item.key
    return manifest.clip(
        cid, "rejected", reason, reason_class=reason_class(reason), **keep, **extra
    )


def _ok(cid: str, flac: Path, item: Item) -> dict:
    extra = {"key": item.key} if item.key != cid else {}
    return manifest.clip(
        cid,
        "ok",
        audio=str(flac),
        audio_offset_s=0.0,
        audio_duration_s=None,
        labels=item.labels,
        origin=item.origin,
        **extra,
    )


def problem_row(p: Problem) -> dict:
    return manifest.clip(
        p.name, p.status, p.reason, reason_class=reason_class(p.reason), unit="file"
    )


def stored_path(item: Item, cid: str, ctx: Context) -> Path:
    """Where the item's audio is kept: 16 kHz FLAC (``audio.keep_audio``), else its own bytes."""
    name = manifest.storage_name(cid)
    return ctx.dest / (f"{name}.flac" if ctx.keep_audio else f"{name}.{item.ext or 'audio'}")


def store_bytes(path: Path, data: bytes, ctx: Context) -> None:
    """Keep an item's bytes under ``path``: written under a temporary name and renamed (a killed
    job leaves no partial file under a final name); fsynced in one pass before the chunk's
    manifest is written (:func:`sync_stored`), which costs one journal commit, not one per file.
    A file cut by a power loss before that pass has the wrong size and is written again."""
    tmp = atomic.temp_path_for(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)
    with ctx.lock:
        ctx.unsynced.append(path)


def sync_stored(ctx: Context) -> None:
    for path in ctx.unsynced:
        atomic.fsync_path(path)
    if ctx.unsynced:
        atomic.fsync_path(ctx.dest)
    ctx.unsynced.clear()


def decode_item(item: Item, cid: str, ctx: Context) -> dict:
    """Decode one item's bytes, check it, store it as FLAC; its manifest row. Without
    ``audio.keep_audio`` the bytes are stored as they came (the mel step decodes them)."""
    flac = stored_path(item, cid, ctx)
    if not ctx.keep_audio:
        store_bytes(flac, item.data, ctx)
        return _ok(cid, flac, item)
    if item.ext in NEEDS_SEEK:
        with tempfile.NamedTemporaryFile(
            dir=ctx.dest,
            prefix=f".{manifest.storage_name(cid)}{atomic.TEMP_MARK}",
            suffix=f".{item.ext}",
        ) as tmp:
            tmp.write(item.data)
            tmp.flush()
            samples, reason, note = audio.load_clip(tmp.name, ctx.rules)
    else:
        samples, reason, note = audio.load_clip(item.origin, ctx.rules, data=item.data)
    if samples is None:
        return _reject(cid, reason, item)
    audio.encode_flac(samples, flac)
    row = _ok(cid, flac, item)
    if note:
        row["note"] = note
    return row


def screen(item: Item, ctx: Context, seen: dict[str, str]) -> tuple[str | None, dict | None]:
    """(clip ID, a finished row) for an item before decoding: a row when it is rejected or
    reused, (ID, None) when it must be decoded, (None, None) when an earlier route has it."""
    cid = ctx.clip_id(item.key)
    if cid is None:
        return item.key, _reject(
            item.key,
            f"bad key: {item.key!r} does not match id_regex {ctx.id_regex.pattern!r}",
            item,
        )
    if item.error:
        return cid, _reject(cid, item.error, item)
    if ctx.listed is not None and cid not in ctx.listed:
        return cid, _reject(
            cid, f"not listed: {cid!r} is not in corpus {ctx.corpus}'s ID list", item
        )
    if ctx.earlier is not None and cid in ctx.earlier:
        ctx.skipped["obtained by an earlier route"] += 1
        return None, None
    if cid in seen:
        return cid, _reject(cid, f"duplicate: key {cid!r} was already in {seen[cid]}", item)
    seen[cid] = item.origin
    stored = stored_path(item, cid, ctx)
    if stored.is_file() and (ctx.keep_audio or stored.stat().st_size == len(item.data or b"")):
        return cid, _ok(cid, stored, item)
    return cid, None


def run(stream: Iterable[Item | Problem], ctx: Context, label: str = "") -> list[dict]:
    """Every item's row, in the reader's order (decodes run ahead in threads, a bounded distance)."""
    ctx.dest.mkdir(parents=True, exist_ok=True)
    atomic.clean_stale_temps(ctx.dest)
    rows: list[dict | cf.Future] = []
    inflight: collections.deque[cf.Future] = collections.deque()
    seen: dict[str, str] = {}
    from tqdm import tqdm

    with cf.ThreadPoolExecutor(max_workers=max(1, ctx.threads)) as pool:
        for obj in tqdm(stream, desc=label, unit="item", file=sys.stdout, mininterval=5):
            if isinstance(obj, Problem):
                rows.append(problem_row(obj))
                continue
            cid, row = screen(obj, ctx, seen)
            if cid is None:
                continue
            if row is not None:
                rows.append(row)
                continue
            future = pool.submit(decode_item, obj, cid, ctx)
            rows.append(future)
            inflight.append(future)
            while len(inflight) > 2 * max(1, ctx.threads):
                inflight.popleft().result()
        return [r.result() if isinstance(r, cf.Future) else r for r in rows]


def write_chunk(out: str, params: dict, chunk: str, clips: list[dict], ctx: Context) -> dict:
    """The chunk's manifest: the clips and what was skipped (once their audio is on disk)."""
    sync_stored(ctx)
    skipped = dict(sorted(ctx.skipped.items()))
    doc = manifest.write_fetch(out, params, chunk, clips, audio.versions(), skipped=skipped)
    if ctx.skipped:
        log.info(f"  skipped: {dict(ctx.skipped)}")
    return doc


def cleanup(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def run_chunk(items, chunk: str, params: dict, out: str, audio_dir: str, download_dir: str) -> dict:
    """One chunk job: ``items(source_cfg, files, download_dir)`` yields the chunk's items."""
    ctx = Context.from_params(params, Path(audio_dir))
    stream = items(params["source_cfg"], params["files"], Path(download_dir))
    clips = run(stream, ctx, f"{params['source']} chunk {chunk}")
    return write_chunk(out, params, chunk, clips, ctx)


def chunk_main(argv: list[str] | None, prog: str, description: str, items) -> None:
    """The command line of a mirror source's chunk job."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    chk = sub.add_parser("chunk", help="obtain, check and decode one chunk's files")
    chk.add_argument("--chunk", required=True)
    chk.add_argument(
        "--params", required=True, help="JSON: source, source_cfg, files, audio, seed, route"
    )
    chk.add_argument("--out", required=True, help="the chunk's raw manifest (JSON)")
    chk.add_argument("--audio-dir", required=True)
    chk.add_argument("--download-dir", required=True)
    args = parser.parse_args(argv)
    logs.setup()
    params = json.loads(args.params)
    run_chunk(items, args.chunk, params, args.out, args.audio_dir, args.download_dir)
