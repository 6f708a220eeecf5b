"""``webdataset`` source: tar shards read one at a time, as the official Dasheng code trains from
them (``<key>.flac|wav|mp3`` + ``<key>.json``), and tar.gz archives of video clips (the audio track
of each ``<key>.mp4``, as in VGGSound's mirror).

``urls`` lists the shards: local paths, globs, brace patterns (``shard-{000000..000099}.tar``),
``https://`` URLs (downloaded with resume into ``downloads/<source>/``) or ``hf://datasets/...``
paths (through huggingface_hub); a chunk is ``shards_per_chunk`` shards. Members are grouped into
samples by WebDataset's rule (consecutive members sharing the name up to the first dot of the base
name). A sample's audio is its member with an extension in ``extensions``; its ``.json``
(``json: required | optional | ignore``) may hold labels (``label_field``).

Bad input becomes rejected rows: a sample without audio, without its json (when required), with
json that does not parse; a tar that ends early (truncated, damaged) keeps the samples before the
damage and adds one rejected row naming the shard ("truncated tar").

``python -m dasheng_pipeline.sources.tars chunk ...`` runs one chunk (see
:mod:`dasheng_pipeline.sources.mirror`).
"""

from __future__ import annotations

import json
import logging
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from dasheng_pipeline.sources import mirror, remote

log = logging.getLogger(__name__)


def split_name(name: str) -> tuple[str, str]:
    """(key, extension) of a member by WebDataset's rule (its own ``base_plus_ext``)."""
    from webdataset.tariterators import base_plus_ext

    key, ext = base_plus_ext(name)
    return (name, "") if key is None else (key, ext.lower())


def members(path: Path, shard: str) -> Iterator[tuple[str, str, bytes] | mirror.Problem]:
    """(key, extension, bytes) of every regular member, streaming (gz, bz2, xz too); a tar that
    ends early ends with a problem naming it."""
    count = 0
    try:
        with open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|*") as tf:
            for info in tf:
                if not info.isfile():
                    continue
                data = tf.extractfile(info).read()
                key, ext = split_name(info.name)
                count += 1
                yield key, ext, data
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        yield mirror.Problem(
            shard,
            "rejected",
            f"truncated tar: {shard} ends early or is damaged after {count} member(s) ({exc}); "
            "the members before the damage were used",
        )


def samples(stream) -> Iterator[tuple[str, dict[str, bytes]] | mirror.Problem]:
    """Group consecutive members of the same key (WebDataset's samples). Members are whole when
    they arrive (a member cut by damage ends the stream instead), so the sample pending at a
    damage is judged on the members it has."""
    key, parts = None, {}
    for obj in stream:
        if isinstance(obj, mirror.Problem):
            if key is not None:
                yield key, parts
            yield obj
            return
        k, ext, data = obj
        if key is not None and k != key:
            yield key, parts
            parts = {}
        key = k
        parts[ext] = data
    if key is not None:
        yield key, parts


def sample_item(key: str, parts: dict[str, bytes], shard: str, src: dict) -> mirror.Item:
    """One sample as an item (with the reason when it cannot be used)."""
    wanted = [e.lower() for e in src["extensions"]]
    audio_exts = [e for e in parts if e.rsplit(".", 1)[-1] in wanted]
    audio_exts.sort(key=lambda e: wanted.index(e.rsplit(".", 1)[-1]))
    item = mirror.Item(key=key, origin=f"{shard}:{key}")
    if not audio_exts:
        item.error = (
            f"no audio: sample {key!r} of {shard} has no member with an extension in "
            f"{src['extensions']} (it has {sorted(parts)})"
        )
        return item
    ext = audio_exts[0]
    item.data, item.ext = parts[ext], ext.rsplit(".", 1)[-1]
    item.origin = f"{shard}:{key}.{ext}"
    mode = src["json"]
    if mode == "ignore":
        return item
    if "json" not in parts:
        if mode == "required":
            item.error = f"no json: {key}.{ext} in {shard} has no {key}.json (set json: optional)"
        return item
    try:
        meta = json.loads(parts["json"])
    except (ValueError, UnicodeDecodeError) as exc:
        item.error = f"bad json: {key}.json in {shard}: {exc}"
        return item
    field = src.get("label_field")
    if field and isinstance(meta, dict) and meta.get(field) is not None:
        value = meta[field]
        item.labels = [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return item


def read_shard(path: Path, shard: str, src: dict) -> Iterator[mirror.Item | mirror.Problem]:
    for obj in samples(members(path, shard)):
        if isinstance(obj, mirror.Problem):
            yield obj
        else:
            yield sample_item(obj[0], obj[1], shard, src)


def fetch_shard(name: str, download_dir: Path, src: dict) -> tuple[Path, bool]:
    """(local path, downloaded here) of a shard."""
    if name.startswith("hf://"):
        return remote.hub_download(remote.parse_hf_url(name), download_dir), True
    if name.startswith(("http://", "https://")):
        dest = download_dir / remote.local_name(name)
        return remote.download(name, dest, remote.HttpOptions.from_config(src)), True
    path = Path(name)
    if not path.is_file():
        raise remote.FetchError(f"not found: shard {name} does not exist", True, "not found")
    return path, False


def items(
    src: dict, shards: list[str], download_dir: Path
) -> Iterator[mirror.Item | mirror.Problem]:
    for name in shards:
        try:
            path, downloaded = fetch_shard(name, download_dir, src)
        except remote.FetchError as exc:
            yield mirror.Problem(name, "rejected" if exc.permanent else "failed", str(exc))
            continue
        yield from read_shard(path, name, src)
        if downloaded and not src["keep_downloads"]:
            mirror.cleanup(path)


def main(argv: list[str] | None = None) -> None:
    mirror.chunk_main(
        argv, "python -m dasheng_pipeline.sources.tars", __doc__.split("\n\n")[0], items
    )


if __name__ == "__main__":
    main()
