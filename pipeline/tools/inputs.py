"""What the commands take as INPUT: audio files, folders (searched recursively) and lists.

- A file with an audio or video extension (``AUDIO_SUFFIXES``) is taken as audio, whatever it
  holds: ffmpeg decides, and a file it cannot decode becomes a reject with ffmpeg's reason.
- A folder: every file under it with such an extension, in sorted order.
- A list: a ``.txt``/``.lst`` file with one path per line (``#`` comments), or a ``.csv`` whose
  ``path`` column (else its first column) names the files; relative paths are relative to the list.

Anything else ends up in the rejects with a reason (a missing path, a folder named like an audio
file, an empty file …), never as an exception: one bad item never stops a run. A file is known by
its resolved path (absolute, links followed), so two spellings of one file are one input.

Reading (:func:`read`, :func:`read_ahead`): a file is decoded once to check it (ffmpeg, as the data
stage does); a short one (up to ``IN_MEMORY_S``) is kept in memory, a longer one is read again
window by window when it is embedded, with the peak its first pass found (``StreamingLogMel``), so
memory stays the same whatever a file's length.
"""

from __future__ import annotations

import collections
import csv
import itertools
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dasheng_model.windows import WINDOW_SAMPLES, StreamingLogMel, split_windows
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


BLOCK_SAMPLES = WINDOW_SAMPLES  # decoded at a time: one 10.08 s window
IN_MEMORY_S = 6 * WINDOW_SAMPLES / audio.SAMPLE_RATE  # longer files are read twice, in windows


class InputError(ValueError):
    """An INPUT argument that names nothing usable at all (e.g. an unreadable list file)."""


@dataclass(frozen=True)
class Item:
    """One input file: the path as given, and what a rerun checks: its resolved path, size and
    modification time."""

    path: str
    size: int
    mtime_ns: int
    real: str = ""  # resolved: absolute, links followed (default: from path)

    def __post_init__(self):
        if not self.real:
            object.__setattr__(self, "real", os.path.realpath(self.path))

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.real, self.size, self.mtime_ns)


@dataclass(frozen=True)
class Reject:
    path: str
    reason: str
    size: int = -1
    mtime_ns: int = -1
    named: bool = False  # a path named on the command line or in a list, not found


def _item(path: Path) -> Item:
    st = path.stat()
    return Item(str(path), st.st_size, st.st_mtime_ns, os.path.realpath(path))


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
                    reason = f"no such file (listed in {path})"
                    rejects.append(Reject(str(entry), reason, named=True))
        elif path.is_file():
            _add_file(path, items, rejects)
        else:
            rejects.append(Reject(str(path), "no such file or folder", named=True))
    seen: set[str] = set()
    unique = [i for i in items if not (i.real in seen or seen.add(i.real))]
    return unique, rejects


def load(item: Item) -> tuple[np.ndarray | None, str]:
    """Decode one whole file to 16 kHz mono float32 (ffmpeg, as the data stage does) and check it.

    Returns ``(samples, "")``, or ``(None, reason)`` for a file that cannot be used.
    """
    if item.size == 0:
        return None, "empty file (0 bytes)"
    samples, reason, _ = audio.load_clip(item.path, RULES)
    return samples, reason


class Stopped(Exception):
    """A read given up because the run stops (interrupted)."""


@dataclass
class Decoded:
    """A checked input: ``reason`` says why it cannot be used ("" when it can); a short one holds
    its samples, a long one the peak dB of its log-mel (the first pass)."""

    item: Item
    reason: str = ""
    samples: np.ndarray | None = None
    n_samples: int = 0
    peak: torch.Tensor | None = None

    @property
    def seconds(self) -> float:
        return self.n_samples / audio.SAMPLE_RATE

    def windows(self, streaming: StreamingLogMel) -> Iterator[torch.Tensor]:
        """The dB log-mel windows (64, ≤ 1008) of the whole file; a long file is decoded again
        (a file that now reads differently raises ``audio.DecodeError``)."""
        if self.samples is not None:
            with torch.no_grad():
                mel = streaming.logmel(torch.from_numpy(self.samples)[None])[0]
            yield from split_windows(mel)
            return
        reader = audio.ClipReader(self.item.path, RULES, BLOCK_SAMPLES)
        with torch.no_grad():
            yield from streaming.windows(reader, self.peak)
        if reader.reason or reader.n_samples != self.n_samples:
            why = reader.reason or f"{reader.n_samples} samples now, {self.n_samples} before"
            raise audio.DecodeError(self.item.path, f"changed while it was read: {why}")


def _blocks(reader: audio.ClipReader, stop: threading.Event | None) -> Iterator[np.ndarray]:
    blocks = iter(reader)
    try:
        for block in blocks:
            if stop is not None and stop.is_set():
                raise Stopped(reader.source)
            yield block
    finally:
        blocks.close()  # stops ffmpeg at once when the read is given up


def read(item: Item, streaming: StreamingLogMel, stop: threading.Event | None = None) -> Decoded:
    """Decode and check ``item``; keep it in memory up to ``IN_MEMORY_S``, else find its peak."""
    if item.size == 0:
        return Decoded(item, "empty file (0 bytes)")
    reader = audio.ClipReader(item.path, RULES, BLOCK_SAMPLES)
    blocks = _blocks(reader, stop)
    keep = int(IN_MEMORY_S * audio.SAMPLE_RATE) // BLOCK_SAMPLES
    head = list(itertools.islice(blocks, keep + 1))
    if len(head) <= keep:  # the whole file
        samples = np.concatenate(head) if head and not reader.reason else None
        return Decoded(item, reader.reason, samples, reader.n_samples)

    def rest() -> Iterator[np.ndarray]:
        while head:
            yield head.pop(0)
        yield from blocks

    with torch.no_grad():
        peak = streaming.peak(rest())
    return Decoded(item, reader.reason, None, reader.n_samples, peak)


def read_ahead(
    items: list[Item], fn: Callable[[Item, threading.Event], Decoded], threads: int, ahead: int
) -> Iterator[Decoded]:
    """``fn(item, stop)`` over ``items`` in order, ``ahead`` running in ``threads``; a consumer that
    stops early (an interrupt) sets ``stop`` and does not wait for the reads under way."""
    stop = threading.Event()
    pool = ThreadPoolExecutor(max_workers=max(1, threads))
    pending: collections.deque[Future] = collections.deque()
    todo = iter(items)
    try:
        for item in itertools.islice(todo, max(1, ahead)):
            pending.append(pool.submit(fn, item, stop))
        while pending:
            decoded = pending.popleft().result()
            for item in itertools.islice(todo, 1):
                pending.append(pool.submit(fn, item, stop))
            if decoded.reason:
                log.warning(f"skipped {decoded.item.path}: {decoded.reason}")
            yield decoded
    finally:
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)


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
