"""Local source: a folder tree of audio files in any format ffmpeg decodes
(e.g. MTG-Jamendo's mp3 folders), with optional labels (from folder names or a CSV).

``python -m dasheng_pipeline.sources.local index`` lists the tree once (sorted, so chunk ``i`` is always the
same files); ``python -m dasheng_pipeline.sources.local chunk`` handles files ``[i*N, (i+1)*N)``: with
``audio.keep_audio`` each is decoded, checked and stored as 16 kHz mono FLAC; without it only
cheap checks are made here and the mel step decodes the original file.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from pathlib import Path

from dasheng_pipeline.common import atomic, audio, logs, manifest, provenance

log = logging.getLogger(__name__)


def list_files(root: str | os.PathLike, extensions: list[str]) -> tuple[list[str], list[str]]:
    """(audio files, ignored files) under ``root`` as sorted relative POSIX paths.
    Hidden files and folders are skipped; symbolic links to folders are not followed."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"local source root {root!r} is not a folder")
    wanted = {e.lower() for e in extensions}
    files, ignored = [], []
    for folder, dirs, names in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel_folder = os.path.relpath(folder, root)
        for name in names:
            if name.startswith("."):
                continue
            rel = name if rel_folder == "." else f"{rel_folder}/{name}".replace(os.sep, "/")
            ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
            (files if ext in wanted else ignored).append(rel)
    return sorted(files), sorted(ignored)


def read_labels_csv(path: str) -> dict[str, list[str]]:
    """``path,labels`` CSV (labels ';'-separated) → {relative path: [labels]}."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"path", "labels"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(
                f"{path}: labels CSV lacks column(s) {sorted(missing)}; "
                f"expected a header 'path,labels' (labels separated by ';'), got {reader.fieldnames}"
            )
        out = {}
        for line_no, row in enumerate(reader, start=2):
            if not row["path"]:
                raise ValueError(f"{path}, line {line_no}: empty 'path'")
            out[row["path"].replace("\\", "/")] = [
                lab.strip() for lab in (row["labels"] or "").split(";") if lab.strip()
            ]
    return out


def labels_for(rel: str, mode: str, table: dict[str, list[str]]) -> list[str]:
    if mode == "folder":
        return [rel.rsplit("/", 2)[-2]] if "/" in rel else []
    if mode == "csv":
        return table.get(rel, [])
    return []


def is_utf8(name: str) -> bool:
    """False for a name holding bytes that are not UTF-8 (os.walk gives them as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(name: str) -> str:
    """A name with its non-UTF-8 bytes shown as \\xNN escapes (valid text for manifests and logs)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def inside(path: str, root: str) -> bool:
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([real, real_root]) == real_root


def ingest_file(
    rel: str,
    root: str,
    labels: list[str],
    dest: Path,
    keep_audio: bool,
    rules: audio.ClipRules,
    allow_outside: bool,
) -> dict:
    """Check (and with keep_audio, convert) one file; returns its manifest row."""
    path = os.path.join(root, rel)
    base = {"path": rel, "labels": labels}
    if not is_utf8(
        rel
    ):  # ffmpeg-python and Parquet take text only: say so instead of failing the job
        shown = printable(rel)
        return manifest.clip(
            shown,
            "rejected",
            "file name is not valid UTF-8 (rename the file)",
            path=shown,
            labels=[],
        )
    if not allow_outside and not inside(path, root):
        return manifest.clip(
            rel,
            "rejected",
            "link points outside the corpus root (allow_outside_paths is false)",
            **base,
        )
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        return manifest.clip(rel, "rejected", f"cannot read file: {exc.strerror}", **base)
    if size == 0:
        return manifest.clip(rel, "rejected", "empty file (0 bytes)", **base)
    if not keep_audio:
        return manifest.clip(
            rel, "ok", audio=path, audio_offset_s=0.0, audio_duration_s=None, **base
        )
    samples, reason, note = audio.load_clip(path, rules)
    if samples is None:
        return manifest.clip(rel, "rejected", reason, **base)
    flac = dest / f"{manifest.storage_name(rel)}.flac"
    audio.encode_flac(samples, flac)
    return manifest.clip(
        rel,
        "ok",
        audio=str(flac),
        audio_offset_s=0.0,
        audio_duration_s=None,
        duration_s=round(samples.size / audio.SAMPLE_RATE, 6),
        **({"note": note} if note else {}),
        **base,
    )


def run_index(params: dict, out: str) -> None:
    src = params["source_cfg"]
    files, ignored = list_files(src["root"], src["extensions"])
    doc = {
        "root": src["root"],
        "files": files,
        "ignored": ignored,
        "chunk_size": int(src["chunk_size"]),
        "provenance": provenance.stamp(params, params.get("seed")),
    }
    atomic.write_json(out, doc, indent=None)
    log.info(
        f"{src['root']}: {len(files)} audio files, {len(ignored)} other files ignored "
        f"(extensions {', '.join(src['extensions'])})"
    )
    for name in ignored[:20]:
        log.info(f"  ignored: {printable(name)}")


def run_chunk(index_path: str, chunk: str, params: dict, out: str, audio_dir: str) -> None:
    src = params["source_cfg"]
    with open(index_path) as fh:
        index = json.load(fh)
    size = index["chunk_size"]
    files = index["files"][int(chunk) * size : (int(chunk) + 1) * size]
    table = read_labels_csv(src["labels_csv"]) if src["labels"] == "csv" else {}
    dest = Path(audio_dir)
    keep_audio = bool(params["audio"]["keep_audio"])
    if keep_audio:
        dest.mkdir(parents=True, exist_ok=True)
        atomic.clean_stale_temps(dest)
    rules = audio.ClipRules.from_config(params["audio"])
    clips = []
    from tqdm import tqdm

    for rel in tqdm(
        files, desc=f"{params['source']} chunk {chunk}", unit="file", file=sys.stdout, mininterval=5
    ):
        clips.append(
            ingest_file(
                rel,
                index["root"],
                labels_for(rel, src["labels"], table),
                dest,
                keep_audio,
                rules,
                bool(params["allow_outside_paths"]),
            )
        )
    manifest.write_fetch(out, params, chunk, clips, audio.versions())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dasheng_pipeline.sources.local", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    idx = sub.add_parser("index", help="list the folder tree once")
    idx.add_argument("--params", required=True, help="JSON: source, source_cfg, seed")
    idx.add_argument("--out", required=True)
    chk = sub.add_parser("chunk", help="ingest one chunk of files")
    chk.add_argument("--index", required=True)
    chk.add_argument("--chunk", required=True)
    chk.add_argument(
        "--params", required=True, help="JSON: source, source_cfg, audio, seed, allow_outside_paths"
    )
    chk.add_argument("--out", required=True)
    chk.add_argument("--audio-dir", required=True)
    args = parser.parse_args(argv)
    logs.setup()
    params = json.loads(args.params)
    if args.command == "index":
        run_index(params, args.out)
    else:
        run_chunk(args.index, args.chunk, params, args.out, args.audio_dir)


if __name__ == "__main__":
    main()
