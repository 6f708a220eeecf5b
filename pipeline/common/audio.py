"""Audio I/O through ffmpeg (via ffmpeg-python): decode anything to 16 kHz mono float32,
check a clip, and write 16 kHz FLAC.

This module is the one place that resolves the ffmpeg binary (:func:`ffmpeg_exe`).

Damaged and truncated files, one rule for every format (:func:`stream` with ``strict``): a file
is undecodable when ffmpeg reports a decoding error, or when it ends before its container says it
ends. ffmpeg itself notices the second for most formats (FLAC, MP4/M4A, a WAV cut inside a
sample: decoding errors); where it goes on silently, the container's own record of its length is
checked once the whole file is read: a WAV's ``data`` chunk size against the bytes present, an MP3's
Xing/Info header (the duration ffmpeg reports, when it is not an estimate from the bitrate)
against the audio decoded, and an Ogg stream (Vorbis, Opus, FLAC in Ogg) must end on a complete
page flagged end-of-stream. A stream without such a record (a raw MP3 without an Info header, a
WAV streamed with an unknown size) cannot be told apart from a complete one and is taken as it is.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import re
import shutil
import struct
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import ffmpeg
import numpy as np

from dasheng_pipeline.common import atomic

SAMPLE_RATE = 16000
# Local inputs may only open local files: a crafted playlist or concat file cannot make
# ffmpeg reach the network or other paths through a protocol.
LOCAL_PROTOCOLS = "file,pipe"
# ffmpeg prefixes messages with "[name @ 0x55d1...]": addresses differ per run, drop them so
# that reasons recorded in manifests are reproducible.
_CONTEXT_PREFIX = re.compile(r"\[[^\]]*@ 0x[0-9a-fA-F]+\]\s*")
_LEVEL = re.compile(r"\[(panic|fatal|error|warning|info|verbose|debug|trace)\]\s*")
_INPUT = re.compile(r"^Input #0, ([\w,]+), from ")
_DURATION = re.compile(r"^Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)")


class DecodeError(RuntimeError):
    """ffmpeg could not decode an input; ``reason`` is ffmpeg's own last message."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


@functools.cache
def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary: $DASHENG_FFMPEG, else ``ffmpeg`` on PATH (Debian, conda),
    else the static binary shipped in the imageio-ffmpeg wheel."""
    override = os.environ.get("DASHENG_FFMPEG")
    if override:
        if not (os.path.isfile(override) and os.access(override, os.X_OK)):
            raise FileNotFoundError(f"DASHENG_FFMPEG={override!r} is not an executable file")
        return override
    on_path = shutil.which("ffmpeg")
    if on_path:
        return on_path
    try:
        import imageio_ffmpeg
    except ImportError as exc:  # pragma: no cover - it is a declared dependency
        raise FileNotFoundError(
            "no ffmpeg found: install the project (pip install -e .) or put ffmpeg on PATH"
        ) from exc
    return imageio_ffmpeg.get_ffmpeg_exe()


@functools.cache
def ffmpeg_version() -> str:
    out = subprocess.run([ffmpeg_exe(), "-hide_banner", "-version"], capture_output=True, text=True)
    first = out.stdout.splitlines()[0] if out.stdout else "unknown"
    return first.removeprefix("ffmpeg version ").split(" ")[0]


@functools.cache
def resampler() -> str:
    """``soxr`` when this ffmpeg has libsoxr (high quality), else ffmpeg's own ``swr``."""
    out = subprocess.run([ffmpeg_exe(), "-hide_banner", "-version"], capture_output=True, text=True)
    return "soxr" if "--enable-libsoxr" in out.stdout else "swr"


def versions() -> dict[str, str]:
    """Audio-tool versions for provenance stamps."""
    return {"ffmpeg": ffmpeg_version(), "resampler": resampler()}


def ffmpeg_input_name(source: str | os.PathLike) -> str:
    """Name ffmpeg should open: URLs as they are, local paths as ``file:<absolute path>``
    so that a file called ``concat:...`` or ``-x`` is never read as a protocol or option."""
    text = os.fspath(source)
    if "://" in text:
        return text
    return "file:" + os.path.abspath(text)


def _decode_args(
    source: str | os.PathLike,
    sample_rate: int,
    start_s: float | None,
    duration_s: float | None,
    from_stdin: bool = False,
):
    input_kwargs, output_kwargs = {}, {}
    if start_s:
        input_kwargs["ss"] = f"{start_s:.6f}"  # input seek: fast and sample-accurate for audio
    if duration_s is not None:
        # ffmpeg's -t counts timestamps, which may start a few ms late after a seek: ask for a
        # little more and let stream() cut the exact number of samples.
        output_kwargs["t"] = f"{duration_s + 0.5:.6f}"
    name = "pipe:0" if from_stdin else ffmpeg_input_name(source)
    if from_stdin:
        # Bytes from a Parquet cell or a tar member: they may open nothing else (a playlist
        # or concat script among them cannot make ffmpeg read a local file).
        input_kwargs["protocol_whitelist"] = "pipe"
    elif name.startswith("file:"):
        input_kwargs["protocol_whitelist"] = LOCAL_PROTOCOLS
    stream = ffmpeg.input(name, **input_kwargs)
    stream = stream.output(
        "pipe:",
        format="f32le",
        acodec="pcm_f32le",
        ac=1,
        ar=sample_rate,
        af=f"aresample=resampler={resampler()}",
        vn=None,
        sn=None,
        **output_kwargs,
    )
    # info: the input's format and declared duration (the truncation checks); each line tagged
    # with its level, so that only errors count as damage
    quiet = ("-nostdin", "-hide_banner", "-nostats", "-loglevel", "repeat+level+info")
    return stream.global_args(*quiet).compile(cmd=ffmpeg_exe())


class _StderrTail(threading.Thread):
    """Drains a pipe (so ffmpeg never blocks on it): keeps its last error lines, the input's
    format and declared duration."""

    def __init__(self, pipe, keep: int = 20):
        super().__init__(daemon=True)
        self.pipe = pipe
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)  # errors
        self.format = ""  # ffmpeg's name of the input's container, e.g. "wav", "ogg", "mp3"
        self.declared_s: float | None = None  # the duration the container declares
        self.estimated = False  # ffmpeg estimated that duration from the bitrate

    def run(self) -> None:
        kind = "error"
        for raw in iter(self.pipe.readline, b""):
            line = _CONTEXT_PREFIX.sub("", raw.decode("utf-8", "replace")).strip()
            level = _LEVEL.match(line)
            text = line[level.end() :].strip() if level else line
            if level:  # a line without one continues the last (a file name with a newline)
                kind = level.group(1)
            if not text:
                continue
            if kind in ("panic", "fatal", "error"):
                self.lines.append(text)
            elif kind == "warning" and "Estimating duration from bitrate" in text:
                self.estimated = True
            elif kind == "info":
                self._info(text)
        self.pipe.close()

    def _info(self, text: str) -> None:
        if m := _INPUT.match(text):
            self.format = self.format or m.group(1)
        elif (m := _DURATION.match(text)) and self.declared_s is None:
            h, mnt, sec = m.groups()
            self.declared_s = int(h) * 3600 + int(mnt) * 60 + float(sec)

    def reason(self, returncode: int) -> str:
        return self.lines[-1] if self.lines else f"ffmpeg exited with status {returncode}"


def _feed(pipe, data: bytes) -> None:
    """Write ``data`` to ffmpeg's stdin (in a thread, so that reading its output never waits on
    it); ffmpeg may stop reading early (a capped duration, a damaged stream)."""
    try:
        pipe.write(data)
    except (BrokenPipeError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError):
            pipe.close()


def _start(args: list[str], data: bytes | None):
    """Start ffmpeg: (process, the thread draining its stderr, the thread feeding ``data``)."""
    proc = subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL if data is None else subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    tail = _StderrTail(proc.stderr)
    tail.start()
    feeder = None
    if data is not None:
        feeder = threading.Thread(target=_feed, args=(proc.stdin, data), daemon=True)
        feeder.start()
    return proc, tail, feeder


def _wav_cut(path: str) -> str | None:
    """A WAV whose ``data`` chunk declares more bytes than the file holds: why, else None."""
    with open(path, "rb") as fh:
        head = fh.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        size = os.fstat(fh.fileno()).st_size
        while chunk := fh.read(8):
            if len(chunk) < 8:
                return None
            name, length = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if name == b"data":
                have = size - fh.tell()
                if length in (0, 0xFFFFFFFF) or have >= length:  # unknown size, or complete
                    return None
                return f"its data chunk declares {length} bytes, the file holds {have}"
            fh.seek(length + (length & 1), os.SEEK_CUR)
    return None


def _ogg_cut(path: str) -> str | None:
    """An Ogg stream whose last page is incomplete or not flagged end-of-stream: why, else None."""
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(max(0, size - 65307 - 27))  # a page is at most 65 307 bytes
        tail = fh.read()
    at = tail.rfind(b"OggS")
    while at >= 0 and (len(tail) - at < 27 or tail[at + 4] != 0):
        at = tail.rfind(b"OggS", 0, at)
    if at < 0:
        return "no Ogg page at its end"
    segments = tail[at + 26]
    table = tail[at + 27 : at + 27 + segments]
    if len(table) < segments or at + 27 + segments + sum(table) > len(tail):
        return "its last Ogg page is incomplete"
    if not tail[at + 5] & 0x04:
        return "its last Ogg page does not end the stream (no end-of-stream flag)"
    return None


def truncation(source: str | os.PathLike, tail: _StderrTail, samples: int, rate: int) -> str | None:
    """Why a file read to its end is shorter than its container says (the module docstring's
    rule), or None. Local files only."""
    path = os.fspath(source)
    if "://" in path or not os.path.isfile(path):
        return None
    formats = set(tail.format.split(","))
    if "wav" in formats:
        return _wav_cut(path)
    if "ogg" in formats:
        return _ogg_cut(path)
    if "mp3" in formats and tail.declared_s is not None and not tail.estimated:
        decoded = samples / rate
        if decoded < tail.declared_s - max(0.1, 0.005 * tail.declared_s):
            return f"{decoded:.2f} s decoded of the {tail.declared_s:.2f} s its header declares"
    return None


def stream(
    source: str | os.PathLike,
    block_samples: int,
    *,
    sample_rate: int = SAMPLE_RATE,
    start_s: float | None = None,
    duration_s: float | None = None,
    strict: bool = True,
    data: bytes | None = None,
) -> Iterator[np.ndarray]:
    """Decode ``source`` and yield consecutive float32 blocks of ``block_samples`` (the last
    one shorter). Memory stays bounded whatever the file's length. With ``data`` (encoded bytes
    held in memory, e.g. a Parquet cell or a tar member), ffmpeg reads them on its stdin and
    ``source`` only names them in messages.

    Raises :class:`DecodeError` at the end when ffmpeg fails, or, with ``strict``, when it
    reported decoding errors (a truncated or damaged file) even though it went on."""
    args = _decode_args(source, sample_rate, start_s, duration_s, from_stdin=data is not None)
    cap = None if duration_s is None else int(round(duration_s * sample_rate))
    proc, tail, feeder = _start(args, data)
    emitted = 0
    reached_end = capped = False
    try:
        while True:
            want = block_samples if cap is None else min(block_samples, cap - emitted)
            if want <= 0:
                capped = True
                break
            chunk = _read_exact(proc.stdout, want * 4)
            usable = len(chunk) - len(chunk) % 4
            if usable:
                emitted += usable // 4
                yield np.frombuffer(chunk[:usable], dtype="<f4").astype(np.float32, copy=True)
            if len(chunk) < want * 4:
                reached_end = True
                break
    finally:
        if not reached_end:  # capped, or the consumer stopped early: stop ffmpeg
            proc.kill()
        proc.stdout.close()
        returncode = proc.wait()
        tail.join(timeout=5)
        if feeder is not None:
            feeder.join(timeout=5)
    if reached_end and returncode != 0:
        raise DecodeError(os.fspath(source), tail.reason(returncode))
    if (reached_end or capped) and strict and tail.lines:
        raise DecodeError(
            os.fspath(source), f"decoding errors (damaged or truncated file): {tail.lines[-1]}"
        )
    if reached_end and strict and not start_s:
        cut = truncation(source, tail, emitted, sample_rate)
        if cut:
            raise DecodeError(os.fspath(source), f"truncated file: {cut}")


def _read_exact(pipe, nbytes: int) -> bytes:
    parts = []
    remaining = nbytes
    while remaining:
        data = pipe.read(remaining)
        if not data:
            break
        parts.append(data)
        remaining -= len(data)
    return b"".join(parts)


def decode(
    source: str | os.PathLike,
    *,
    sample_rate: int = SAMPLE_RATE,
    start_s: float | None = None,
    duration_s: float | None = None,
    strict: bool = True,
    block_samples: int = SAMPLE_RATE * 60,
    data: bytes | None = None,
) -> np.ndarray:
    """Decode a whole file (or the segment ``start_s`` + ``duration_s``) to float32 mono;
    ``data``: encoded bytes in memory instead of a file (``source`` names them)."""
    blocks = list(
        stream(
            source,
            block_samples,
            sample_rate=sample_rate,
            start_s=start_s,
            duration_s=duration_s,
            strict=strict,
            data=data,
        )
    )
    return np.concatenate(blocks) if blocks else np.zeros(0, np.float32)


@dataclass(frozen=True)
class ClipRules:
    """What a clip must satisfy to be used (config section ``audio``)."""

    min_duration_s: float = 0.1
    max_duration_s: float = 3600.0
    too_long: str = "truncate"  # or "reject"
    silence_dbfs: float = -90.0
    decode_errors: str = "reject"  # or "keep": keep what decoded before the damage

    @classmethod
    def from_config(cls, audio_cfg: dict) -> ClipRules:
        return cls(
            min_duration_s=float(audio_cfg["min_duration_s"]),
            max_duration_s=float(audio_cfg["max_duration_s"]),
            too_long=str(audio_cfg["too_long"]),
            silence_dbfs=float(audio_cfg["silence_dbfs"]),
            decode_errors=str(audio_cfg["decode_errors"]),
        )


def check_stats(
    n_samples: int, n_nonfinite: int, peak: float, rules: ClipRules, sample_rate: int = SAMPLE_RATE
) -> str | None:
    """Why a decoded clip cannot be used (from its running statistics), or None."""
    if n_samples == 0:
        return "no audio decoded (empty or zero-length stream)"
    if n_nonfinite:
        return f"{n_nonfinite} of {n_samples} samples are NaN or infinite"
    seconds = n_samples / sample_rate
    if seconds < rules.min_duration_s:
        return f"too short: {seconds:.3f} s < audio.min_duration_s={rules.min_duration_s:g}"
    peak_db = 20 * np.log10(peak) if peak > 0 else float("-inf")
    if peak_db < rules.silence_dbfs:
        return f"silent: peak {peak_db:.1f} dBFS < audio.silence_dbfs={rules.silence_dbfs:g}"
    return None


def check_clip(samples: np.ndarray, rules: ClipRules, sample_rate: int = SAMPLE_RATE) -> str | None:
    """Why a decoded clip cannot be used, or None when it is fine."""
    finite = np.isfinite(samples)
    peak = float(np.abs(samples[finite]).max()) if finite.any() else 0.0
    return check_stats(samples.size, int(samples.size - finite.sum()), peak, rules, sample_rate)


class ClipReader:
    """Decode one clip as consecutive blocks while checking it against the rules.

    Iterate it to the end, then read ``reason`` ("" when the clip is usable) and ``note``
    (set when it was truncated). Blocks are only trustworthy once ``reason`` is empty: a
    damaged file is only known to be damaged when ffmpeg finishes. Memory is one block.
    """

    def __init__(
        self,
        source: str | os.PathLike,
        rules: ClipRules,
        block_samples: int,
        *,
        start_s: float | None = None,
        duration_s: float | None = None,
        sample_rate: int = SAMPLE_RATE,
        data: bytes | None = None,
    ):
        self.source, self.rules, self.block_samples = source, rules, block_samples
        self.start_s, self.duration_s, self.sample_rate = start_s, duration_s, sample_rate
        self.data = data
        self.reason = "not read yet"
        self.note = ""
        self.n_samples = 0

    def __iter__(self) -> Iterator[np.ndarray]:
        rules, sr = self.rules, self.sample_rate
        limit = int(round(rules.max_duration_s * sr))
        # Decode a second more than the limit, to know whether the clip is longer than it.
        span = rules.max_duration_s + 1.0
        span = span if self.duration_s is None else min(self.duration_s, span)
        n = nonfinite = 0
        peak = 0.0
        try:
            for block in stream(
                self.source,
                self.block_samples,
                sample_rate=sr,
                start_s=self.start_s,
                duration_s=span,
                strict=rules.decode_errors == "reject",
                data=self.data,
            ):
                truncated = n + block.size > limit
                if truncated:
                    if rules.too_long == "reject":
                        self.reason = (
                            f"too long: over audio.max_duration_s={rules.max_duration_s:g} s "
                            "(raise it, or set audio.too_long: truncate)"
                        )
                        return
                    block = block[: limit - n]
                    self.note = f"truncated to audio.max_duration_s={rules.max_duration_s:g} s"
                finite = np.isfinite(block)
                nonfinite += int(block.size - finite.sum())
                if finite.any():
                    peak = max(peak, float(np.abs(block[finite]).max()))
                n += block.size
                self.n_samples = n
                if block.size:
                    yield block
                if truncated:
                    break
        except DecodeError as exc:
            self.reason = f"undecodable: {exc.reason}"
            return
        self.reason = check_stats(n, nonfinite, peak, rules, sr) or ""


def encode_flac(
    samples: np.ndarray, path: str | os.PathLike, *, sample_rate: int = SAMPLE_RATE
) -> None:
    """Write mono float32 samples as 16-bit FLAC, atomically and bit-exactly (no encoder tags)."""
    samples = np.ascontiguousarray(samples, dtype="<f4")
    with atomic.atomic_path(path) as tmp:
        args = (
            ffmpeg.input("pipe:", format="f32le", ar=sample_rate, ac=1)
            .output(
                str(tmp),
                format="flac",
                acodec="flac",
                sample_fmt="s16",
                fflags="+bitexact",
                **{"flags:a": "+bitexact", "map_metadata": "-1"},
            )
            .global_args("-nostdin", "-hide_banner", "-loglevel", "error", "-y")
            .compile(cmd=ffmpeg_exe())
        )
        proc = subprocess.run(args, input=samples.tobytes(), capture_output=True)
        if proc.returncode != 0:
            lines = proc.stderr.decode("utf-8", "replace").strip().splitlines()
            raise DecodeError(os.fspath(path), lines[-1] if lines else "flac encoding failed")


def load_clip(
    source: str | os.PathLike,
    rules: ClipRules,
    *,
    start_s: float | None = None,
    duration_s: float | None = None,
    sample_rate: int = SAMPLE_RATE,
    data: bytes | None = None,
) -> tuple[np.ndarray | None, str, str]:
    """Decode and check one whole clip. Returns ``(samples, reason, note)``: samples is None
    when the clip is rejected (``reason`` says why); ``note`` says when it was truncated. With
    ``data``, the encoded bytes come from memory (ffmpeg's stdin) and ``source`` names them."""
    reader = ClipReader(
        source,
        rules,
        sample_rate * 60,
        start_s=start_s,
        duration_s=duration_s,
        sample_rate=sample_rate,
        data=data,
    )
    blocks = list(reader)
    if reader.reason:
        return None, reader.reason, reader.note
    return np.concatenate(blocks), "", reader.note
