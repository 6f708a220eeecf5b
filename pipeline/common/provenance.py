"""Provenance stamps: config hash, seed, package versions and git SHA.

Every artifact the pipeline writes (manifest, shard, checkpoint, result) carries the dict
returned by :func:`stamp`. It holds no timestamps or host names, so the same config and
seed at the same commit give byte-identical artifacts.
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import io
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from dasheng_pipeline.common import atomic, logs
from dasheng_pipeline.common.atomic import canonical_json

REPO_ROOT = Path(__file__).resolve().parents[2]

# Packages whose versions can change an artifact's bytes or numbers.
TRACKED_PACKAGES = (
    "torch",
    "torchaudio",
    "numpy",
    "pyarrow",
    "yt-dlp",
    "ffmpeg-python",
    "imageio-ffmpeg",
    "safetensors",
    "scikit-learn",
    "ray",
    "bitsandbytes",
)


def config_hash(section: Any) -> str:
    """Short sha256 of the canonical JSON of a config section (16 hex digits)."""
    return hashlib.sha256(canonical_json(section).encode()).hexdigest()[:16]


@functools.cache
def package_versions() -> dict[str, str]:
    versions = {"python": ".".join(map(str, sys.version_info[:3]))}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


@functools.cache
def git_sha() -> str:
    """Commit of the project checkout, with ``-dirty`` when tracked files differ from it.

    ``DASHENG_GIT_SHA`` overrides it (for installs without a .git folder).
    """
    override = os.environ.get("DASHENG_GIT_SHA")
    if override:
        return override
    try:
        sha = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def stamp(
    section: Any, seed: int | None = None, extra_versions: dict[str, str] | None = None
) -> dict:
    """The provenance record of an artifact produced from ``section`` of the config."""
    versions = dict(package_versions())
    if "torch" in sys.modules:  # the CPU kernels that computed it (numerics: native | portable)
        versions["cpu_kernels"] = sys.modules["torch"].backends.cpu.get_cpu_capability()
    if extra_versions:
        versions.update(extra_versions)
    return {
        "config_hash": config_hash(section),
        "seed": seed,
        "versions": versions,
        "git_sha": git_sha(),
    }


def table(paths: list[str]) -> str:
    """CSV with one row per artifact: its provenance stamp (for the HTML report)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["artifact", "config_hash", "seed", "git_sha", "versions"])
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
        stamp = doc.get("provenance") or {}
        versions = " ".join(f"{k}={v}" for k, v in sorted((stamp.get("versions") or {}).items()))
        writer.writerow(
            [path, stamp.get("config_hash"), stamp.get("seed"), stamp.get("git_sha"), versions]
        )
    return out.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dasheng_pipeline.common.provenance",
        description="collect the provenance stamps of JSON artifacts into a CSV",
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("artifacts", nargs="+", help="JSON files with a 'provenance' key")
    args = parser.parse_args(argv)
    logs.setup()
    with atomic.atomic_open(args.out, "w", encoding="utf-8") as fh:
        fh.write(table(args.artifacts))


if __name__ == "__main__":
    main()
