"""``hf_parquet`` source: Parquet files whose rows embed the encoded audio, as the Hugging Face
``datasets`` library stores an ``Audio`` column (a struct of ``bytes`` and ``path``), next to an ID
column and optionally a label column (AudioSet's mirrors: FLAC at 48 kHz, one row per clip).

The files come from a local snapshot folder (``path``) or from a dataset repo on the hub
(``repo`` + ``revision``, through huggingface_hub: a chunk job fetches only its own files, into
``downloads/<source>/``, and deletes them when done unless ``keep_downloads``). Which files:
``files`` (a list) or ``include`` (fnmatch patterns, matched the same way against a snapshot's
files and a repo's listing, so both give the same chunks). A chunk is ``files_per_chunk`` files.

``python -m dasheng_pipeline.sources.hf_parquet chunk ...`` runs one chunk (see
:mod:`dasheng_pipeline.sources.mirror` for what happens to each row).
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from dasheng_pipeline.sources import mirror, remote

log = logging.getLogger(__name__)

BATCH_ROWS = 16  # rows read at once (a 10 s 48 kHz stereo FLAC is about 1.5 MB)


def list_files(src: dict, hub_cache: str | os.PathLike | None = None) -> list[str]:
    """The source's Parquet files (relative to its snapshot folder or repo), sorted, as Snakemake
    builds the DAG: the ``files`` key, or the snapshot's files / the repo's listing matching
    ``include``."""
    if src.get("files"):
        return list(dict.fromkeys(src["files"]))
    patterns = src["include"]
    if src.get("path"):
        root = src["path"]
        if not os.path.isdir(root):
            raise FileNotFoundError(f"snapshot folder {root!r} not found")
        found = []
        for folder, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            rel = os.path.relpath(folder, root)
            for name in names:
                path = name if rel == "." else f"{rel}/{name}"
                if any(fnmatch.fnmatchcase(path, p) for p in patterns):
                    found.append(path)
        return sorted(found)
    if hub_cache:  # a folder of remembered listings (remote.listing_cache)
        return remote.hub_list_cached(hub_cache, src["repo"], src["revision"], patterns)
    return remote.hub_list(src["repo"], src["revision"], patterns)


def _labels(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [str(v) for v in value if v is not None]
    return [str(value)]


def _audio_cell(cell) -> tuple[bytes | None, str]:
    """(bytes, path) of an Audio cell (struct) or a plain binary cell."""
    if isinstance(cell, dict):
        return cell.get("bytes"), cell.get("path") or ""
    return cell, ""


def read_rows(path: Path, name: str, src: dict) -> Iterator[mirror.Item | mirror.Problem]:
    """The items of one Parquet file; a file that cannot be read (to its end) is a problem."""
    import pyarrow.parquet as pq

    columns = [src["id_column"], src["audio_column"]]
    if src.get("label_column"):
        columns.append(src["label_column"])
    try:
        pf = pq.ParquetFile(path)
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            yield mirror.Problem(
                name,
                "rejected",
                f"bad columns: {name} has no column(s) {missing} (it has {pf.schema_arrow.names}); "
                "set id_column / audio_column / label_column",
            )
            return
        row = 0
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns):
            for rec in batch.to_pylist():
                yield _item(rec, src, f"{name} row {row}")
                row += 1
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid / ArrowIOError are both
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        yield mirror.Problem(name, "rejected", f"unreadable: {name}: {first}")


def _item(rec: dict, src: dict, origin: str) -> mirror.Item:
    key = rec[src["id_column"]]
    data, apath = _audio_cell(rec[src["audio_column"]])
    labels = _labels(rec.get(src["label_column"])) if src.get("label_column") else []
    item = mirror.Item(
        key="" if key is None else str(key),
        origin=origin,
        data=data,
        ext=mirror.sniff_ext(data, apath),
        labels=labels,
    )
    if key is None or item.key == "":
        item.key = origin.replace(" ", "_")
        item.error = f"no id: {origin} has an empty {src['id_column']}"
    elif not data:
        item.error = f"no audio: {origin} has no bytes in column {src['audio_column']}"
    return item


def fetch_file(src: dict, name: str, download_dir: Path) -> Path:
    """The local path of one of the source's files (fetched from the hub when needed)."""
    if src.get("path"):
        path = Path(src["path"]) / name
        if not path.is_file():
            raise remote.FetchError(
                f"not found: {name} is not in the snapshot folder {src['path']}",
                permanent=True,
                reason_class="not found",
            )
        return path
    hub = remote.HubFile(src["repo"], src["revision"], name)
    return remote.hub_download(hub, download_dir)


def items(
    src: dict, files: list[str], download_dir: Path
) -> Iterator[mirror.Item | mirror.Problem]:
    for name in files:
        try:
            path = fetch_file(src, name, download_dir)
        except remote.FetchError as exc:
            yield mirror.Problem(name, "rejected" if exc.permanent else "failed", str(exc))
            continue
        yield from read_rows(path, name, src)
        if not src.get("path") and not src["keep_downloads"]:
            mirror.cleanup(path)


def main(argv: list[str] | None = None) -> None:
    mirror.chunk_main(
        argv, "python -m dasheng_pipeline.sources.hf_parquet", __doc__.split("\n\n")[0], items
    )


if __name__ == "__main__":
    main()
