"""Chunk manifests: one JSON file per chunk job listing every clip with its status.

Status vocabulary (every clip ends in exactly one):

``ok``        usable audio (``audio`` names the file to decode).
``failed``    could not be obtained this time (network error, removed video); a rerun retries it.
``rejected``  bad input (invalid ID or times, duplicate, undecodable, silent, too short ...);
              a rerun does not change that unless the input changes.

Manifests are deterministic (sorted keys, clips in list order, no timestamps) and written
atomically; each carries the provenance stamp of the config that produced it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from dasheng_pipeline.common import atomic, provenance

log = logging.getLogger(__name__)

STATUSES = ("ok", "failed", "rejected")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")


def clip(clip_id: str, status: str, reason: str = "", **fields) -> dict:
    """One manifest row. ``fields``: audio, labels, start_s, end_s, row, note, ..."""
    if status not in STATUSES:
        raise ValueError(f"unknown status {status!r}; expected one of {STATUSES}")
    if status != "ok" and not reason:
        raise ValueError(f"clip {clip_id!r}: a {status} clip needs a reason")
    return {"clip_id": clip_id, "status": status, "reason": reason, **fields}


def storage_name(clip_id: str) -> str:
    """A file name for a clip: the ID itself when it is a safe name, else a hash of it (so no
    clip ID can escape its folder or clash with another after cleaning)."""
    if _SAFE_NAME.match(clip_id) and ".." not in clip_id:
        return clip_id
    return "h" + hashlib.sha256(clip_id.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def summary(clips: Iterable[dict]) -> dict[str, int]:
    counts = Counter(c["status"] for c in clips)
    return {status: counts.get(status, 0) for status in STATUSES}


def write(
    path: str | Path,
    *,
    stage: str,
    source: str,
    chunk: str,
    clips: list[dict],
    provenance: dict,
    **extra,
) -> dict:
    doc = {
        "stage": stage,
        "source": source,
        "chunk": chunk,
        "summary": summary(clips),
        "clips": clips,
        "provenance": provenance,
        **extra,
    }
    atomic.write_json(path, doc)
    return doc


def write_fetch(
    out: str | Path, params: dict, chunk: str, clips: list[dict], versions: dict, **extra
) -> dict:
    """Write a source job's chunk manifest (stamped with the job's params, seed and the given
    tool versions) and print its summary; ``extra``: more top-level keys (e.g. ``skipped``)."""
    stamp = provenance.stamp(params, params.get("seed"), versions)
    doc = write(
        out,
        stage="fetch",
        source=params["source"],
        chunk=chunk,
        clips=clips,
        provenance=stamp,
        **extra,
    )
    print_summary(f"{params['source']} chunk {chunk}", clips)
    return doc


def read(path: str | Path) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: manifest missing; rerun the rule that writes it"
        ) from None
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{path}: not a valid manifest ({exc}); delete it and rerun its rule"
        ) from None
    for key in ("stage", "clips", "summary", "provenance"):
        if key not in doc:
            raise ValueError(f"{path}: manifest has no {key!r} key; delete it and rerun its rule")
    return doc


def print_summary(label: str, clips: list[dict]) -> None:
    counts = summary(clips)
    log.info(
        f"{label}: ok {counts['ok']} / failed {counts['failed']} / rejected {counts['rejected']}"
    )
    for c in clips:
        if c["status"] != "ok":
            log.info(f"  {c['status']:8s} {c['clip_id']}: {c['reason']}")
