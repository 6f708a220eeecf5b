"""What the mirror sources and the corpora's routes mean for the DAG, as Snakemake builds it: each
mirror source's units (Parquet files, tar shards, archives) known from the config, a file listing
or the hub's listing (never by reading the data), grouped into chunks; the local files a chunk
reads (its inputs); and each route's place in its corpus. Every problem is a one-line ValueError
naming the config key."""

from __future__ import annotations

import os
from dataclasses import dataclass

from dasheng_pipeline.sources import hf_parquet, http_archive, remote

MIRROR_TYPES = ("hf_parquet", "webdataset", "http_archive")
PER_CHUNK = {
    "hf_parquet": "files_per_chunk",
    "webdataset": "shards_per_chunk",
    "http_archive": "archives_per_chunk",
}


def _hf_parquet_units(name: str, src: dict, cache_dir: str | None) -> list:
    if bool(src.get("path")) == bool(src.get("repo")):
        raise ValueError(
            f"config key sources.{name}: give either path (a local snapshot) or repo (a hub dataset)"
        )
    try:
        return hf_parquet.list_files(src, cache_dir or remote.listing_cache())
    except (FileNotFoundError, ValueError) as exc:
        raise ValueError(f"config key sources.{name}: {exc}") from None


def _webdataset_units(name: str, src: dict, cache_dir: str | None) -> list:
    try:
        return remote.expand(src["urls"], cache_dir or remote.listing_cache())
    except ValueError as exc:
        raise ValueError(f"config key sources.{name}.urls: {exc}") from None


def _http_archive_units(name: str, src: dict, cache_dir: str | None) -> list:
    try:
        return http_archive.list_archives(src)
    except (OSError, ValueError) as exc:
        raise ValueError(f"config key sources.{name}: {exc}") from None


UNITS = {
    "hf_parquet": _hf_parquet_units,
    "webdataset": _webdataset_units,
    "http_archive": _http_archive_units,
}


def units(name: str, src: dict, cache_dir: str | None = None) -> list:
    """The source's units in order (Parquet file names relative to its snapshot or repo; shard
    paths or URLs; ``{"url", "sha256"}`` archives)."""
    return UNITS[src["type"]](name, src, cache_dir)


def chunks_of(src: dict, all_units: list) -> list[list]:
    """Consecutive groups of ``<files|shards|archives>_per_chunk`` units (one chunk when none,
    whose job then records that the source offered nothing)."""
    per = int(src[PER_CHUNK[src["type"]]])
    groups = [all_units[i : i + per] for i in range(0, len(all_units), per)]
    return groups or [[]]


def local_inputs(src: dict, chunk_units: list) -> list[str]:
    """The local files a chunk reads (its Snakemake inputs, so that a rule may make them)."""
    if src["type"] == "hf_parquet":
        return [os.path.join(src["path"], f) for f in chunk_units] if src.get("path") else []
    if src["type"] == "webdataset":
        return [u for u in chunk_units if "://" not in u]
    return [src["checksums"]] if src.get("checksums") else []


@dataclass(frozen=True)
class Route:
    """A source's place in a corpus: the corpus, and the routes before it (their key tables hold
    the IDs obtained earlier)."""

    corpus: str
    position: int
    earlier: tuple[str, ...]


ROUTE_TYPES = (*MIRROR_TYPES, "youtube", "demo")


def routes(corpora: dict, sources: dict) -> dict[str, Route]:
    """Each route source's :class:`Route`; one-line errors for a route that is no source, a
    source in two corpora, a type that cannot be a route, a youtube route reading another list."""
    out: dict[str, Route] = {}
    for corpus, spec in corpora.items():
        for position, name in enumerate(spec["routes"]):
            key = f"corpora.{corpus}.routes"
            if name not in sources:
                raise ValueError(
                    f"config key {key}: {name!r} is not a source (sources: {sorted(sources)})"
                )
            if name in out:
                raise ValueError(
                    f"config key {key}: source {name!r} is already a route of corpus {out[name].corpus}"
                )
            src = sources[name]
            if src["type"] not in ROUTE_TYPES:
                raise ValueError(
                    f"config key {key}: a {src['type']} source cannot be a route ({name!r})"
                )
            if src["type"] == "youtube" and os.path.realpath(src["list"]) != os.path.realpath(
                spec["list"]
            ):
                raise ValueError(
                    f"config key sources.{name}.list: a route of corpus {corpus} reads its list "
                    f"{spec['list']!r}; name the same file"
                )
            if src["type"] == "youtube" and src["format"] != spec["format"]:
                raise ValueError(
                    f"config key sources.{name}.format: corpus {corpus}'s list is {spec['format']}"
                )
            out[name] = Route(corpus, position, tuple(spec["routes"][:position]))
    return out
