"""Embed audio files with a Dasheng encoder: ``dasheng-pipeline embed`` and its Python function
(user documentation: ``docs/cli/embed.md``; the output files: :mod:`dasheng_pipeline.tools.store`).

    from dasheng_pipeline.tools import embed_files, read_embeddings
    summary = embed_files(["recordings/"], "random:tiny", "e.parquet", frames=True)
    e = read_embeddings("e.parquet")  # e.paths, e.clips (N, D), e.frames[i] (T_i, D)

How a file is embedded, as the paper's protocol: decode to 16 kHz mono (ffmpeg, any format, any
rate and channels), the 64-bin dB log-mel of the whole file, cut into windows of 1008 mel frames
(252 tokens, 10.08 s, the model's positional range; the last one shorter), each window through the
encoder on its own, the frames concatenated, the clip embedding their mean. Memory does not grow
with a file's length: a file longer than a minute is decoded twice, once to check it and find its
log-mel's peak (the 120 dB floor is relative to it), once to embed it window by window
(:class:`dasheng_model.windows.StreamingLogMel`: the same numbers as the whole-file log-mel), and
its frames go to disk as they come. Windows of many files share the encoder's batches
(:class:`dasheng_model.windows.WindowBatcher`).

Resumable: finished rows are written as a part (``OUT.parts/``) every ``flush_s`` seconds and when
the run is interrupted (SIGINT, SIGTERM: the message says how many files it kept), then merged into
``OUT``. A rerun skips every file whose resolved path, size and modification time match a row or a
reject (another spelling of the same path included), so a killed run continues and a finished one
does nothing. An ``OUT`` made by other weights, or by something else, is refused.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from dasheng_model import pretrained
from dasheng_model.embed import FRAME_MS
from dasheng_model.encoder import DashengEncoder, release_plain_weights
from dasheng_model.frontend import LogMel
from dasheng_model.inputs import check_dtype
from dasheng_model.windows import (
    WINDOW_FRAMES,
    StreamingLogMel,
    Window,
    WindowBatcher,
    clip_mean,
    embed_mels,
    mel_frames,
)
from dasheng_pipeline.common import audio, provenance
from dasheng_pipeline.tools import inputs, store
from dasheng_pipeline.tools.store import (  # noqa: F401 (the names callers import from here)
    EmbedError,
    parts_dir,
    read_embeddings,
    read_rejects,
    rejects_path,
    write_rejects,
)

log = logging.getLogger(__name__)
AUDIO = inputs.AUDIO_SUFFIXES
FLUSH_S = 30.0  # seconds between parts


class NothingEmbedded(EmbedError):
    """Every input was rejected (OUT is written, empty of them; the reasons in the rejects)."""

    def __init__(self, message: str, summary: Summary):
        super().__init__(message)
        self.summary = summary


class MissingInputs(EmbedError):
    """Named inputs that do not exist (the rest was embedded)."""

    def __init__(self, message: str, summary: Summary):
        super().__init__(message)
        self.summary = summary


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during a run, after what was finished was written; ``message`` says how much."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


# -- the model side ----------------------------------------------------------------------------


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda``, ``cuda:N``, ``mps`` … → a
    device that works here; else a ``ValueError`` naming ``--device``."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"--device {name}: not a device; use auto, cpu, cuda or cuda:N (e.g. cuda:1)"
        ) from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU here; use --device cpu (or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"--device {name}: there are {torch.cuda.device_count()} CUDA GPU(s), numbered from 0"
        )
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise ValueError(f"--device {name}: not available here ({exc}); use --device cpu") from exc
    return device


def autocast(device: torch.device, dtype: str):
    """bf16: autocast (training in finetune's full mode; inference goes through ``dasheng_model.embed``)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=check_dtype(dtype) == "bf16")


@dataclass
class Model:
    """An encoder loaded from a spec, with what the outputs record about it."""

    spec: str
    encoder: DashengEncoder
    sha256: str
    device: torch.device
    dtype: str = "fp32"
    logmel: LogMel = field(default_factory=LogMel)

    @classmethod
    def load(cls, spec: str, device: str = "auto", dtype: str = "fp32") -> Model:
        dev = resolve_device(device)
        dtype = check_dtype(dtype)  # a bad name fails before the weights load
        encoder = pretrained.load(spec, dev).eval()
        return cls(str(spec), encoder, pretrained.weights_sha256(spec, encoder), dev, dtype)

    @property
    def dim(self) -> int:
        return self.encoder.embed_dim

    def mel(self, samples: np.ndarray) -> torch.Tensor:
        """16 kHz mono float32 → dB log-mel (64, T), fp32 on the CPU."""
        with torch.no_grad():
            return self.logmel(torch.from_numpy(samples)[None])[0]

    def frames(self, mels: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
        """dB log-mels (64, T_i) → frame embeddings (T_i // 4, D) float32, one per input, in
        10.08 s windows through the batcher (:func:`dasheng_model.windows.embed_mels`)."""
        return [f for f, _ in embed_mels(self.encoder, mels, batch_size, self.dtype)]

    def batcher(self, batch_size: int) -> WindowBatcher:
        return WindowBatcher(self.encoder, batch_size, self.dtype)


@dataclass
class WholeFile:
    """A model that takes a whole file at once: the log-mel baseline (``logmel``) or a HEAR module
    (``hear:<module>[:<path>]``), through the evaluation's embedders. Unlike an encoder's, its
    memory grows with a file's length."""

    spec: str
    embedder: object  # dasheng_pipeline.evaluation.embeddings.Embedder
    sha256: str
    dim: int
    device: torch.device = torch.device("cpu")
    dtype: str = "fp32"
    logmel: LogMel = field(default_factory=LogMel)

    @classmethod
    def load(cls, spec: str, device: str = "auto", dtype: str = "fp32") -> WholeFile:
        from dasheng_pipeline.evaluation.embeddings import build_embedder

        resolve_device(device)  # a bad --device fails the same way
        embedder = build_embedder(spec, dtype=dtype)
        return cls(spec, embedder, embedder.sha256, embedder.dim, dtype=embedder.dtype)

    def embed(self, decoded: inputs.Decoded) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
        """A checked file → (frames (T, D), their times in ms, clip (D,))."""
        rate = self.embedder.sample_rate
        samples = decoded.samples
        if samples is None or rate != audio.SAMPLE_RATE:
            samples = audio.decode(decoded.item.path, sample_rate=rate)
        ((frames, times, clip),) = self.embedder([samples])
        return torch.from_numpy(np.asarray(frames)), np.asarray(times), torch.from_numpy(clip)


def load_model(spec: str, device: str = "auto", dtype: str = "fp32") -> Model | WholeFile:
    """Any model spec string: an encoder (a checkpoint, a hub id, ``random:``) as a :class:`Model`,
    ``logmel`` and ``hear:<module>[:<path>]`` as a :class:`WholeFile`."""
    from dasheng_pipeline.evaluation.embeddings import HEAR_PREFIX, LOGMEL

    if str(spec) == LOGMEL or str(spec).startswith(HEAR_PREFIX):
        return WholeFile.load(str(spec), device, dtype)
    return Model.load(spec, device, dtype)


def embed_waveforms(
    model: Model, waves: list[np.ndarray], batch_size: int = 8
) -> list[torch.Tensor]:
    """16 kHz mono waveforms → frame embeddings (T_i, D) each (clip embedding: their mean)."""
    return model.frames([model.mel(w) for w in waves], batch_size)


# -- one run -----------------------------------------------------------------------------------


@dataclass
class Summary:
    out: str
    embedded: int = 0  # this run
    skipped: int = 0  # already done (rows or rejects of an earlier run)
    rejected: int = 0  # this run
    rows: int = 0  # in OUT after the run
    seconds: float = 0.0
    audio_seconds: float = 0.0
    missing: list[str] = field(default_factory=list)  # named inputs that do not exist
    usable: int = 0  # this run's inputs with a row in OUT (embedded now or before)

    def line(self) -> str:
        speed = (
            f", {self.audio_seconds / self.seconds:.0f}x real time"
            if self.embedded and self.seconds
            else ""
        )
        return (
            f"{self.out}: embedded {self.embedded} files ({self.audio_seconds:.0f} s of audio) in "
            f"{self.seconds:.1f} s{speed}; skipped {self.skipped} done before; rejected {self.rejected}; "
            f"{self.rows} rows in all"
        )


@dataclass
class _File:
    """A file being embedded: its windows' results as they come (written in order)."""

    decoded: inputs.Decoded
    writer: store.FramesWriter | None
    windows: int | None = None  # known once every window was handed to the batcher
    received: int = 0
    frames: int = 0
    total: torch.Tensor | None = None  # float64 sum of the frames
    waiting: dict[int, Window] = field(default_factory=dict)  # arrived ahead of their turn
    writer_next: int = 0  # the next window the frames file takes
    clip: torch.Tensor | None = None  # given by a whole-file model

    def put(self, index: int, window: Window) -> None:
        self.received += 1
        self.total = window.sum.double() if self.total is None else self.total + window.sum
        self.frames += window.frames.shape[0]
        if self.writer is None:
            return
        self.waiting[index] = window
        while self.writer_next in self.waiting:
            self.writer.write(self.waiting.pop(self.writer_next).frames)
            self.writer_next += 1

    @property
    def done(self) -> bool:
        return self.windows is not None and self.received == self.windows


class _Run:
    """The state of one ``embed_files`` run: files in flight, rows not yet in a part."""

    def __init__(
        self, model: Model | WholeFile, out: Path, frames: bool, batch_size: int, flush_s: float
    ):
        self.model, self.out, self.with_frames = model, out, frames
        self.batcher = model.batcher(batch_size) if isinstance(model, Model) else None
        self.streaming = StreamingLogMel(model.logmel)
        self.flush_s, self.last_flush = flush_s, time.monotonic()
        self.files: dict[int, _File] = {}
        self.started = 0  # files handed to embed(): their ids
        self.rows: list[dict] = []  # finished, not yet in a part
        self.kept = 0  # rows of this run written to parts
        self.rejects: dict[str, inputs.Reject] = {}
        self.meta: dict = {}
        self.summary: Summary | None = None
        self.bar = None
        parts = parts_dir(out)
        self.next_part = len(list(parts.glob("part-*.parquet"))) if parts.is_dir() else 0

    def reject(self, item: inputs.Item, reason: str) -> None:
        self.rejects[item.real] = inputs.Reject(item.real, reason, item.size, item.mtime_ns)

    def embed(self, decoded: inputs.Decoded) -> None:
        """Hand a checked file's windows to the batcher (results come back as batches run)."""
        fid = self.started
        self.started += 1
        writer = None
        if self.with_frames:
            name = store.frames_name(decoded.item)
            writer = store.FramesWriter(store.frames_dir(self.out) / name, self.model.dim)
        f = self.files[fid] = _File(decoded, writer)
        self.bar.total += decoded.seconds
        n = 0
        try:
            if self.batcher is None:
                self._whole(fid, f)
                return
            for n, mel in enumerate(decoded.windows(self.streaming), 1):
                self._take(self.batcher.add((fid, n - 1), mel))
                self.flush_if_due()
        except audio.DecodeError as exc:
            self._drop(fid, f"undecodable: {exc.reason}")
            return
        f.windows = n
        if f.done:
            self._finish(fid)

    def _whole(self, fid: int, f: _File) -> None:
        """A whole-file model: the file at once, its own frame times and clip."""
        frames, times, f.clip = self.model.embed(f.decoded)
        if f.writer is not None:
            f.writer.write(frames, times)
            f.writer_next = 1
        f.windows = 1
        f.put(-1, Window((fid, 0), frames, frames.sum(0)))  # (-1: already written)
        self.bar.update(f.decoded.seconds)
        self._finish(fid)
        self.flush_if_due()

    def _take(self, results: list[Window]) -> None:
        for r in results:
            fid, index = r.key
            f = self.files.get(fid)
            if f is None:  # dropped meanwhile
                continue
            f.put(index, r)
            self.bar.update(r.frames.shape[0] * FRAME_MS / 1000)
            if f.done:
                self._finish(fid)

    def _drop(self, fid: int, reason: str) -> None:
        f = self.files.pop(fid)
        if f.writer is not None:
            f.writer.discard()
        self.reject(f.decoded.item, reason)
        log.warning(f"skipped {f.decoded.item.path}: {reason}")

    def _finish(self, fid: int) -> None:
        f = self.files.pop(fid)
        item, n = f.decoded.item, f.decoded.n_samples
        row = {
            "path": item.real,
            "input": item.path,
            "size": item.size,
            "mtime_ns": item.mtime_ns,
            "duration_s": n / audio.SAMPLE_RATE,
            "chunks": -(-mel_frames(n) // WINDOW_FRAMES),
            "num_frames": f.frames,
            "embedding": (f.clip if f.clip is not None else clip_mean(f.total, f.frames)).numpy(),
        }
        if f.writer is not None:
            f.writer.commit()
            row["frames_file"] = f"{store.frames_dir(self.out).name}/{f.writer.path.name}"
        self.rows.append({**row, "model": self.model.spec, "model_sha256": self.model.sha256})
        self.summary.embedded += 1
        self.summary.audio_seconds += f.decoded.seconds

    def flush_if_due(self, force: bool = False) -> None:
        """Write the finished rows as a part, every ``flush_s`` seconds (``force``: now)."""
        if not self.rows or not (force or time.monotonic() - self.last_flush >= self.flush_s):
            return
        table = pa.Table.from_pylist(
            self.rows, schema=store.schema(self.model.dim, self.with_frames)
        )
        store.write_table(
            table, parts_dir(self.out) / f"part-{self.next_part:06d}.parquet", self.meta
        )
        self.next_part += 1
        self.kept += len(self.rows)
        self.rows.clear()
        self.last_flush = time.monotonic()

    def close(self) -> None:
        if self.batcher is not None:
            self._take(self.batcher.flush())
        self.flush_if_due(force=True)

    def abort(self) -> None:
        """Interrupted: the files in flight are given up, the finished ones written."""
        for fid in list(self.files):
            f = self.files.pop(fid)
            if f.writer is not None:
                f.writer.discard()
        self.flush_if_due(force=True)


# -- the run -----------------------------------------------------------------------------------


def _metadata(model: Model | WholeFile, with_frames: bool, batch_size: int) -> dict:
    section = {
        "model": model.spec,
        "model_sha256": model.sha256,
        "dtype": model.dtype,
        "frames": with_frames,
        "window_frames": WINDOW_FRAMES,
    }
    return {
        **section,
        "dim": model.dim,
        "batch_size": batch_size,
        "provenance": provenance.stamp(section, None, audio.versions()),
    }


def _check_numbers(batch_size: int, decode_threads: int, flush_s: float) -> None:
    for name, value in (("--batch-size", batch_size), ("--decode-threads", decode_threads)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise EmbedError(f"{name} {value}: expected a whole number of at least 1")
    if not flush_s >= 0:
        raise EmbedError(f"flush_s {flush_s}: expected a number of seconds >= 0")


def _done_before(
    out: Path, model: Model | WholeFile, frames: bool
) -> tuple[set, dict[str, inputs.Reject]]:
    """The keys of OUT's rows (and parts), and its rejects; refuses another model's OUT."""
    tables = store.read_tables(out, model.dim, frames)
    stored = next((t.column("model_sha256")[0].as_py() for t in tables if t.num_rows), None)
    if stored is not None and stored != model.sha256:
        raise EmbedError(
            f"{out} holds embeddings of other weights (sha256 {stored[:12]}…, this model "
            f"{model.sha256[:12]}…); pass another --out, or delete it"
        )
    done = {
        key
        for t in tables
        for key in zip(*(t.column(c).to_pylist() for c in ("path", "size", "mtime_ns")))
    }
    return done, read_rejects(rejects_path(out))


def _todo(items: list[inputs.Item], done: set, old_rejects: dict) -> list[inputs.Item]:
    def seen(i: inputs.Item) -> bool:
        r = old_rejects.get(i.real)
        return i.key in done or (r is not None and (r.size, r.mtime_ns) == (i.size, i.mtime_ns))

    return [i for i in items if not seen(i)]


def _merge(run: _Run, old_rejects: dict[str, inputs.Reject]) -> None:
    """OUT's rows and the parts' into OUT (a changed file: its newest row), sorted by path; the
    rejects beside it; always an OUT, even an empty one."""
    out, parts = run.out, parts_dir(run.out)
    tables = store.read_tables(out, run.model.dim, run.with_frames)
    empty = store.schema(run.model.dim, run.with_frames).empty_table()
    table = pa.concat_tables([empty, *tables])
    last = {p: i for i, p in enumerate(table.column("path").to_pylist())}
    table = table.take(pa.array(sorted(last.values()), pa.int64())).sort_by("path")
    if parts.is_dir() or not out.is_file():
        store.write_table(table, out, run.meta)
    if run.with_frames:
        store.remove_orphan_frames(out, table)
    if parts.is_dir():
        shutil.rmtree(parts)
    rejects = {**old_rejects, **run.rejects}
    embedded = set(table.column("path").to_pylist())
    rejects = {p: r for p, r in rejects.items() if p not in embedded}
    if rejects != old_rejects or not rejects_path(out).is_file():
        write_rejects(rejects_path(out), rejects)
    run.summary.rows = table.num_rows


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM raises KeyboardInterrupt (as SIGINT does), in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _loop(run: _Run, todo: list[inputs.Item], threads: int, progress: bool) -> None:
    from tqdm import tqdm

    read = lambda item, stop: inputs.read(item, run.streaming, stop)  # noqa: E731
    decoded_files = inputs.read_ahead(todo, read, threads, 4 * threads)
    with (
        contextlib.closing(decoded_files),
        tqdm(
            total=0.0,
            unit="s",
            desc="embed (audio seconds)",
            disable=not progress or not todo,
            file=sys.stderr,
            mininterval=2,
            bar_format="{desc}: {n:.0f}/{total:.0f} s {percentage:3.0f}% [{elapsed}<{remaining}, {rate_fmt}]",
        ) as run.bar,
    ):
        for decoded in decoded_files:
            if decoded.reason:
                run.reject(decoded.item, decoded.reason)
            else:
                run.embed(decoded)
        run.close()


def _interrupted(run: _Run, old_rejects: dict) -> Interrupted:
    run.abort()
    _merge(run, old_rejects)
    s = run.summary
    return Interrupted(
        f"interrupted: kept the {s.embedded} files this run finished ({s.rows} rows in {run.out}, "
        f"{len(run.rejects)} new rejects); rerun the same command to continue"
    )


def _outcome(run: _Run, items: list[inputs.Item]) -> None:
    """The errors that come after the work: nothing usable, named inputs that do not exist."""
    s = run.summary
    if not s.usable:
        found = f"{len(items)} files found" if items else "no audio file found"
        raise NothingEmbedded(
            f"nothing could be embedded ({found}, extensions: {' '.join(sorted(AUDIO))}); "
            f"{run.out} holds no row of them, the reasons are in {rejects_path(run.out)}",
            s,
        )
    if s.missing:
        more = f" and {len(s.missing) - 3} more" if len(s.missing) > 3 else ""
        raise MissingInputs(
            f"{len(s.missing)} named input(s) not found: {', '.join(s.missing[:3])}{more}; "
            f"the rest is embedded in {run.out}",
            s,
        )


def embed_files(
    inputs_: list[str | Path],
    model: str | Model,
    out: str | Path,
    *,
    frames: bool = False,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "fp32",
    decode_threads: int = 2,
    flush_s: float | None = None,
    progress: bool = True,
) -> Summary:
    """Embed every audio file named by ``inputs_`` into ``out`` (Parquet); see the module docstring.

    ``batch_size``: 10 s windows per forward pass; ``flush_s``: seconds between the parts written
    while the run goes (default ``FLUSH_S``, 30 s). Raises :class:`EmbedError` (after the work)
    when a named input does not exist or nothing could be embedded, :class:`Interrupted` on
    SIGINT / SIGTERM.
    """
    t0 = time.perf_counter()
    out = Path(out)
    flush_s = FLUSH_S if flush_s is None else flush_s
    _check_numbers(batch_size, decode_threads, flush_s)
    store.check_writable(out)
    store.check_ours(out)
    if not isinstance(model, Model | WholeFile):
        model = load_model(model, device, dtype)
        if isinstance(model, Model) and model.device.type == "cpu":
            # a model of its own, only for inference: its packed weights replace the plain ones
            release_plain_weights(model.encoder, model.dtype)
    done, old_rejects = _done_before(out, model, frames)
    items, rejects = inputs.collect(inputs_)
    todo = _todo(items, done, old_rejects)
    run = _Run(model, out, frames, batch_size, flush_s)
    run.meta, run.summary = _metadata(model, frames, batch_size), Summary(str(out))
    run.summary.skipped = len(items) - len(todo)
    run.summary.missing = [r.path for r in rejects if r.named]
    run.rejects.update((r.path, r) for r in rejects)
    log.info(
        f"model {model.spec} ({model.dim}-d, sha256 {model.sha256[:12]}…, {model.dtype} on {model.device}); "
        f"{len(items)} files, {run.summary.skipped} done before, {len(todo)} to embed"
    )
    try:
        with _sigterm_interrupts():
            _loop(run, todo, decode_threads, progress)
    except KeyboardInterrupt:
        raise _interrupted(run, old_rejects) from None
    _merge(run, old_rejects)
    run.summary.rejected = len(run.rejects)
    run.summary.usable = run.summary.embedded + sum(i.key in done for i in items)
    run.summary.seconds = time.perf_counter() - t0
    log.info(run.summary.line())
    _outcome(run, items)
    return run.summary
