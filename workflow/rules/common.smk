# Helpers shared by the stage files (paths, chunk lists known at config time, job params).
import json
import math
import os
from pathlib import Path

from pipeline import lists, local, provenance

# Jobs run `python -m pipeline...`/`model...` from this checkout, in whatever environment
# runs them (the project's .venv, or a per-rule conda env with --sdm conda).
# (Snakemake formats the prefix too, hence the doubled braces.)
shell.prefix('export PYTHONPATH="%s${{PYTHONPATH:+:$PYTHONPATH}}"; ' % workflow.basedir)

OUT = config["out_dir"]
LOGS = f"{OUT}/logs"
SOURCES = config["sources"]


def names_of(kind):
    return [name for name, src in SOURCES.items() if src["type"] == kind]


def constraint(names):
    """Wildcard regex matching exactly these source names (never matching when empty)."""
    return "|".join(names) if names else "(?!x)x"


def check_inside(key, path):
    """With allow_outside_paths: false, refuse inputs outside the working directory."""
    if config["allow_outside_paths"]:
        return
    real, here = os.path.realpath(path), os.path.realpath(".")
    if os.path.commonpath([real, here]) != here:
        raise ValueError(
            f"config key {key}: {path!r} lies outside the working directory and "
            "allow_outside_paths is false; move the input or set allow_outside_paths: true"
        )


def _count_chunks(name, src):
    if src["type"] == "demo":
        return lists.n_chunks(src["clips"], src["chunk_size"])
    if src["type"] == "youtube":
        check_inside(f"sources.{name}.list", src["list"])
        if not os.path.isfile(src["list"]):
            raise FileNotFoundError(
                f"config key sources.{name}.list: segment list {src['list']!r} not found"
            )
        return lists.n_chunks(lists.count_rows(src["list"]), src["chunk_size"])
    check_inside(f"sources.{name}.root", src["root"])
    if src["labels"] == "csv" and not src["labels_csv"]:
        raise ValueError(f"config key sources.{name}.labels_csv: required when labels is 'csv'")
    files, _ = local.list_files(src["root"], src["extensions"])
    src["_files"] = len(files)  # a change of the tree re-runs the index (it is a param)
    return lists.n_chunks(len(files), src["chunk_size"])


CHUNKS = {name: [f"{i:05d}" for i in range(_count_chunks(name, src))] for name, src in SOURCES.items()}


def as_json(obj):
    return provenance.canonical_json(obj)


def source_params(name, **extra):
    """Params of a source's jobs: its own config, the audio rules, the seed."""
    src = {k: v for k, v in SOURCES[name].items() if not k.startswith("_")}
    return as_json(
        {
            "source": name,
            "source_cfg": src,
            "audio": config["audio"],
            "seed": config["seed"],
            "allow_outside_paths": config["allow_outside_paths"],
            **extra,
        }
    )


def features_params():
    """Params of the mel step: everything that defines the shards' bytes."""
    return as_json(
        {
            "mel": config["mel"],
            "audio": config["audio"],
            "shards": config["shards"],
            "seed": config["seed"],
        }
    )


def fetch_manifest(wildcards):
    return f"{OUT}/manifests/{wildcards.source}/{wildcards.chunk}.json"


def all_fetch_manifests():
    return [f"{OUT}/manifests/{name}/{chunk}.json" for name in SOURCES for chunk in CHUNKS[name]]


def all_shards(ext):
    """Every chunk's shard (ext "parquet") or shard manifest (ext "json")."""
    return [f"{OUT}/shards/{name}/{chunk}.{ext}" for name in SOURCES for chunk in CHUNKS[name]]
