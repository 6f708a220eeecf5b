"""What the commands take as INPUT: audio files, folders (searched recursively) and lists.

- A file with an audio or video extension (``AUDIO_SUFFIXES``) is taken as audio, whatever it
  holds: ffmpeg decides, and a file it cannot decode becomes a reject with ffmpeg's reason.
- A folder: every file under it with such an extension, in sorted order.
- A list: a ``.txt``/``.lst`` file with one path per line (``#`` comments), or a ``.csv`` whose
  ``path`` column (else its first column) names the files; relative paths are relative to the list.

Anything else ends up in the rejects with a reason (a missing path, a folder named like an audio
file, an empty file …), never as an exception: one bad item never stops a run.
"""

from __future__ import annotations

import csv
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dasheng_pipeline.common import audio

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = frozenset(
    ".wav .flac .mp3 .ogg .oga .opus .m4a .aac .wma .aif .aiff .aifc .au .snd .caf .w64 .amr .spx "
    ".mka .mkv .mp4 .m4v .mov .webm .avi .3gp".split()
)
LIST_SUFFIXES = frozenset({".txt", ".lst", ".csv"})
# What an input must be to be embedded: one token (40 ms) at least; long recordings are fine.
RULES = audio.ClipRules(
    min_duration_s=0.04,
    max_duration_s=24 * 3600.0,
    too_long="reject",
    silence_dbfs=-90.0,
    decode_errors="reject",
)


class InputError(ValueError):
    """An INPUT argument that names nothing usable at all (e.g. an unreadable list file)."""


@dataclass(frozen=True)
class Item:
    """One input file, identified by path, size and modification time (what a rerun checks)."""

    path: str
    size: int
    mtime_ns: int

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.path, self.size, self.mtime_ns)


@dataclass(frozen=True)
class Reject:
    path: str
    reason: str
    size: int = -1
    mtime_ns: int = -1


def _item(path: Path) -> Item:
    st = path.stat()
    return Item(str(path), st.st_size, st.st_mtime_ns)


def _read_list(path: Path) -> list[Path]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read this list of files ({exc})") from exc
    if path.suffix.lower() == ".csv":
        rows = list(csv.reader(text.splitlines()))
        if not rows:
            return []
        header = [h.strip().lower() for h in rows[0]]
        column = header.index("path") if "path" in header else 0
        body = rows[1:] if "path" in header else rows
        names = [r[column].strip() for r in body if len(r) > column and r[column].strip()]
    else:
        names = [
            line.strip()
            for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
    return [(path.parent / n) if not os.path.isabs(n) else Path(n) for n in names]


def _walk(folder: Path, items: list[Item], rejects: list[Reject]) -> None:
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs.sort()
        for name in dirs:
            if Path(name).suffix.lower() in AUDIO_SUFFIXES:
                rejects.append(
                    Reject(
                        str(Path(root) / name),
                        "a directory, not an audio file (its contents are searched)",
                    )
                )
        for name in sorted(files):
            if Path(name).suffix.lower() in AUDIO_SUFFIXES:
                _add_file(Path(root) / name, items, rejects)


def _add_file(path: Path, items: list[Item], rejects: list[Reject]) -> None:
    try:
        items.append(_item(path))
    except OSError as exc:
        rejects.append(Reject(str(path), f"cannot read its size and time ({exc.strerror or exc})"))


def collect(inputs: list[str | os.PathLike]) -> tuple[list[Item], list[Reject]]:
    """INPUT arguments → (audio files to read, in order and without repeats; rejects)."""
    items: list[Item] = []
    rejects: list[Reject] = []
    for raw in inputs:
        path = Path(raw).expanduser()
        if path.is_dir():
            _walk(path, items, rejects)
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            for entry in _read_list(path):
                if entry.is_dir():
                    rejects.append(
                        Reject(
                            str(entry),
                            f"a directory (listed in {path}); list files, or pass the folder itself",
                        )
                    )
                elif entry.is_file():
                    _add_file(entry, items, rejects)
                else:
                    rejects.append(Reject(str(entry), f"no such file (listed in {path})"))
        elif path.is_file():
            _add_file(path, items, rejects)
        else:
            rejects.append(Reject(str(path), "no such file or folder"))
    seen: set[str] = set()
    unique = [i for i in items if not (i.path in seen or seen.add(i.path))]
    return unique, rejects


def load(item: Item) -> tuple[np.ndarray | None, str]:
    """Decode one file to 16 kHz mono float32 (ffmpeg, as the data stage does) and check it.

    Returns ``(samples, "")``, or ``(None, reason)`` for a file that cannot be used.
    """
    if item.size == 0:
        return None, "empty file (0 bytes)"
    samples, reason, _ = audio.load_clip(item.path, RULES)
    return samples, reason


def load_all(
    items: list[Item], *, threads: int = 2, desc: str = "decode", progress: bool = True
) -> Iterator[tuple[Item, np.ndarray | None, str]]:
    """:func:`load` over ``items`` in order, decoding ahead in ``threads``, with a progress bar;
    yields ``(item, samples, "")`` or ``(item, None, reason)`` (the reason also logged as a warning)."""
    from tqdm import tqdm

    from dasheng_pipeline.evaluation.embeddings import prefetch

    with tqdm(
        total=len(items),
        unit="file",
        desc=desc,
        disable=not progress or not items,
        file=sys.stderr,
        mininterval=2,
    ) as bar:
        for item, fut in prefetch(load, items, threads, 4 * max(threads, 1)):
            samples, reason = fut.result()
            if samples is None:
                log.warning(f"skipped {item.path}: {reason}")
            yield item, samples, reason
            bar.update(1)
