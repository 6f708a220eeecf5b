"""Embed audio files with a Dasheng encoder: ``dasheng-pipeline embed`` and its Python function.

    from dasheng_pipeline.tools import embed_files
    summary = embed_files(["recordings/"], "random:tiny", "e.parquet", frames=True)

One row per file in ``OUT`` (Parquet): ``path``, ``size``, ``mtime_ns``, ``duration_s``, ``chunks``
(10.08 s model windows), ``embedding`` (D float32: the mean of the 25 Hz frames), with ``frames``
also ``frames`` (T × D) and ``frame_times_ms`` (T, frame centres), then ``model`` and
``model_sha256``. The file's metadata holds the provenance (config hash, seed, versions, git SHA).
Files that cannot be used go to ``OUT`` with ``.rejects.csv`` (path, reason, size, mtime_ns).

How a file is embedded, as the paper's protocol: decode to 16 kHz mono (ffmpeg, any format, any
rate and channels), the 64-bin dB log-mel of the whole file, cut into windows of 1008 mel frames
(252 tokens, 10.08 s, the model's positional range; the last one shorter), each window through the
encoder on its own, the frames concatenated. That is what the encoder does with a long input in one
call (and so what the HEAR module returns), but windows of many files share a batch here: they are
sorted by length, so files of similar length go through together and padding stays small.

Resumable: rows are written in parts (``OUT.parts/``) as the run goes, and a rerun skips every file
whose path, size and modification time match a row or a reject, so a killed run continues and a
finished one does nothing. An ``OUT`` made by other weights is refused (pass another ``--out``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dasheng_model import pretrained
from dasheng_model.embed import embed_mel, frame_times_ms
from dasheng_model.encoder import MAX_TOKENS, DashengEncoder
from dasheng_model.frontend import HOP_LENGTH, LogMel
from dasheng_model.inputs import FRAMES_PER_TOKEN, check_dtype
from dasheng_pipeline.common import atomic, audio, provenance
from dasheng_pipeline.tools import inputs

log = logging.getLogger(__name__)
AUDIO = inputs.AUDIO_SUFFIXES

WINDOW_FRAMES = MAX_TOKENS * FRAMES_PER_TOKEN  # 1008 mel frames: 10.08 s, one pass of the encoder
META_KEY = b"dasheng"


class EmbedError(ValueError):
    """A run that cannot start (e.g. ``--out`` holds another model's embeddings)."""


# -- the model side ----------------------------------------------------------------------------


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
    def load(cls, spec: str, device: str = "cpu", dtype: str = "fp32") -> Model:
        dev = torch.device(device)
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
        """dB log-mels (64, T_i) → frame embeddings (T_i // 4, D) float32, one per input.

        Each mel is cut into windows of 1008 frames; the windows of all inputs are sorted by
        length and run ``batch_size`` at a time, padded to the longest of their batch (padding is
        masked out, so an item's result does not depend on its batch mates beyond float rounding).
        """
        windows = []  # (input index, window index, mel window (64, ≤ 1008))
        counts = []  # windows per input
        for i, mel in enumerate(mels):
            pieces = [p for p in mel.split(WINDOW_FRAMES, dim=1) if p.shape[1] >= FRAMES_PER_TOKEN]
            windows += [(i, w, p) for w, p in enumerate(pieces)]
            counts.append(len(pieces))
        order = sorted(range(len(windows)), key=lambda j: -windows[j][2].shape[1])
        out: dict[tuple[int, int], torch.Tensor] = {}
        for b in range(0, len(order), batch_size):
            batch = [windows[j] for j in order[b : b + batch_size]]
            mel = torch.zeros(
                len(batch), batch[0][2].shape[0], batch[0][2].shape[1]
            )  # (b, 64, longest)
            valid = torch.empty(len(batch), dtype=torch.long)
            for k, (_, _, piece) in enumerate(batch):
                mel[k, :, : piece.shape[1]] = piece
                valid[k] = piece.shape[1]
            result = embed_mel(
                self.encoder, mel.to(self.device), valid, dtype=self.dtype
            )  # bf16: autocast
            for k, (i, w, _) in enumerate(batch):
                out[(i, w)] = (
                    result.frames[k, : int(result.num_frames[k])].float().cpu()
                )  # (≤ 252, D)
        return [
            torch.cat([out[(i, w)] for w in range(n)]) if n else torch.zeros(0, self.dim)
            for i, n in enumerate(counts)
        ]


def embed_waveforms(
    model: Model, waves: list[np.ndarray], batch_size: int = 8
) -> list[torch.Tensor]:
    """16 kHz mono waveforms → frame embeddings (T_i, D) each (clip embedding: their mean)."""
    return model.frames([model.mel(w) for w in waves], batch_size)


# -- the output table --------------------------------------------------------------------------


def schema(dim: int, with_frames: bool) -> pa.Schema:
    fields = [
        pa.field("path", pa.string()),
        pa.field("size", pa.int64()),
        pa.field("mtime_ns", pa.int64()),
        pa.field("duration_s", pa.float64()),
        pa.field("chunks", pa.int32()),
        pa.field("embedding", pa.list_(pa.float32(), dim)),
    ]
    if with_frames:
        fields += [
            pa.field("frames", pa.list_(pa.list_(pa.float32(), dim))),
            pa.field("frame_times_ms", pa.list_(pa.float32())),
        ]
    return pa.schema(
        fields + [pa.field("model", pa.string()), pa.field("model_sha256", pa.string())]
    )


def rejects_path(out: Path) -> Path:
    return out.with_name(out.stem + ".rejects.csv")


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def read_rejects(path: Path) -> dict[str, inputs.Reject]:
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as fh:
        return {
            r["path"]: inputs.Reject(r["path"], r["reason"], int(r["size"]), int(r["mtime_ns"]))
            for r in csv.DictReader(fh)
        }


def write_rejects(path: Path, rejects: dict[str, inputs.Reject]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "reason", "size", "mtime_ns"])
    for r in sorted(rejects.values(), key=lambda r: r.path):
        writer.writerow([r.path, r.reason, r.size, r.mtime_ns])
    atomic.write_bytes(path, buf.getvalue().encode("utf-8"))


def _read_tables(out: Path) -> list[pa.Table]:
    tables = []
    if out.is_file():
        tables.append(pq.read_table(out))
    parts = parts_dir(out)
    if parts.is_dir():
        atomic.clean_stale_temps(parts)
        tables += [pq.read_table(p) for p in sorted(parts.glob("part-*.parquet"))]
    return tables


def _stored_model(tables: list[pa.Table]) -> str | None:
    for t in tables:
        if t.num_rows:
            return t.column("model_sha256")[0].as_py()
    return None


@dataclass
class Summary:
    out: str
    embedded: int = 0  # this run
    skipped: int = 0  # already done (rows or rejects of an earlier run)
    rejected: int = 0  # this run
    rows: int = 0  # in OUT after the run
    seconds: float = 0.0
    audio_seconds: float = 0.0

    def line(self) -> str:
        speed = (
            f", {self.embedded / self.seconds:.1f} files/s"
            if self.embedded and self.seconds
            else ""
        )
        return (
            f"{self.out}: embedded {self.embedded} files ({self.audio_seconds:.0f} s of audio) in "
            f"{self.seconds:.1f} s{speed}; skipped {self.skipped} done before; rejected {self.rejected}; "
            f"{self.rows} rows in all"
        )


def _rows(
    items: list[inputs.Item],
    waves: list[np.ndarray],
    frames: list[torch.Tensor],
    model: Model,
    with_frames: bool,
) -> pa.Table:
    cols: dict[str, list] = {k: [] for k in schema(model.dim, with_frames).names}
    for item, wave, f in zip(items, waves, frames):
        mel_frames = wave.size // HOP_LENGTH + 1
        cols["path"].append(item.path)
        cols["size"].append(item.size)
        cols["mtime_ns"].append(item.mtime_ns)
        cols["duration_s"].append(wave.size / audio.SAMPLE_RATE)
        cols["chunks"].append(-(-mel_frames // WINDOW_FRAMES))
        cols["embedding"].append(f.mean(dim=0).numpy())
        if with_frames:
            cols["frames"].append(list(f.numpy()))
            cols["frame_times_ms"].append(frame_times_ms(f.shape[0]).numpy())
        cols["model"].append(model.spec)
        cols["model_sha256"].append(model.sha256)
    return pa.table(cols, schema=schema(model.dim, with_frames))


def _metadata(model: Model, with_frames: bool, batch_size: int) -> dict:
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


def _write(table: pa.Table, path: Path, meta: dict) -> None:
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
    with atomic.atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_embeddings(path: str | Path) -> tuple[pa.Table, dict]:
    """An ``embed`` output → (its table, its metadata: model, sha256, dtype, provenance …)."""
    table = pq.read_table(path)
    meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
    return table, meta


# -- the run -----------------------------------------------------------------------------------


def embed_files(  # noqa: C901 (to split: issue 24)
    inputs_: list[str | Path],
    model: str | Model,
    out: str | Path,
    *,
    frames: bool = False,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "fp32",
    decode_threads: int = 2,
    part_files: int = 256,
    progress: bool = True,
) -> Summary:
    """Embed every audio file named by ``inputs_`` into ``out`` (Parquet); see the module docstring.

    ``batch_size``: 10 s windows per forward pass; ``part_files``: files per part written while the
    run goes (what a killed run keeps).
    """
    t0 = time.perf_counter()
    out = Path(out)
    if out.suffix != ".parquet":
        raise EmbedError(f"--out {out}: expected a .parquet file name")
    model = model if isinstance(model, Model) else Model.load(model, device, dtype)
    tables = _read_tables(out)
    stored = _stored_model(tables)
    if stored is not None and stored != model.sha256:
        raise EmbedError(
            f"{out} holds embeddings of other weights (sha256 {stored[:12]}…, this model "
            f"{model.sha256[:12]}…); pass another --out, or delete it"
        )
    if tables and any(t.schema.names != schema(model.dim, frames).names for t in tables):
        raise EmbedError(
            f"{out} was written {'without' if frames else 'with'} --frames; rerun the same way, "
            "or pass another --out"
        )
    done = {
        key
        for t in tables
        for key in zip(
            t.column("path").to_pylist(),
            t.column("size").to_pylist(),
            t.column("mtime_ns").to_pylist(),
        )
    }
    old_rejects = read_rejects(rejects_path(out))
    items, rejects = inputs.collect(inputs_)
    todo = [
        i
        for i in items
        if i.key not in done
        and not ((r := old_rejects.get(i.path)) and (r.size, r.mtime_ns) == (i.size, i.mtime_ns))
    ]
    summary = Summary(str(out), skipped=len(items) - len(todo))
    new_rejects = {r.path: r for r in rejects}
    meta = _metadata(model, frames, batch_size)
    parts = parts_dir(out)
    next_part = len(list(parts.glob("part-*.parquet"))) if parts.is_dir() else 0
    log.info(
        f"model {model.spec} ({model.dim}-d, sha256 {model.sha256[:12]}…, {model.dtype} on {model.device}); "
        f"{len(items)} files, {summary.skipped} done before, {len(todo)} to embed"
    )

    pending: list[tuple[inputs.Item, np.ndarray]] = []  # decoded, not yet embedded
    finished: list[pa.Table] = []  # embedded, not yet written
    finished_rows = 0

    def run_pending() -> None:
        nonlocal finished_rows
        if pending:
            its, waves = zip(*pending)
            f = embed_waveforms(model, list(waves), batch_size)
            finished.append(_rows(list(its), list(waves), f, model, frames))
            finished_rows += len(its)
            summary.embedded += len(its)
            summary.audio_seconds += sum(w.size for w in waves) / audio.SAMPLE_RATE
            pending.clear()

    def write_part() -> None:
        nonlocal next_part, finished_rows
        if finished:
            _write(pa.concat_tables(finished), parts / f"part-{next_part:06d}.parquet", meta)
            next_part += 1
            finished.clear()
            finished_rows = 0

    windows_pending = 0
    for item, samples, reason in inputs.load_all(
        todo, threads=decode_threads, desc="embed", progress=progress
    ):
        if samples is None:
            new_rejects[item.path] = inputs.Reject(item.path, reason, item.size, item.mtime_ns)
        else:
            pending.append((item, samples))
            windows_pending += 1 + samples.size // (WINDOW_FRAMES * HOP_LENGTH)
        if windows_pending >= 4 * batch_size:
            run_pending()
            windows_pending = 0
        if finished_rows >= part_files:
            write_part()
    run_pending()
    write_part()

    summary.rejected = len(new_rejects)
    all_rejects = {p: r for p, r in old_rejects.items()}
    all_rejects.update(new_rejects)
    tables = _read_tables(out)
    summary.rows = sum(t.num_rows for t in tables)
    if tables and parts.is_dir():  # new rows: merge them with the old into OUT, sorted by path
        table = pa.concat_tables(tables)
        last = {
            p: i for i, p in enumerate(table.column("path").to_pylist())
        }  # a changed file: its new row
        table = table.take(sorted(last.values())).sort_by("path")
        embedded = set(table.column("path").to_pylist())
        all_rejects = {p: r for p, r in all_rejects.items() if p not in embedded}
        _write(table, out, meta)
        summary.rows = table.num_rows
    if parts.is_dir():
        shutil.rmtree(parts)
    if all_rejects != old_rejects or not rejects_path(out).is_file():
        write_rejects(rejects_path(out), all_rejects)
    summary.seconds = time.perf_counter() - t0
    log.info(summary.line())
    if not items and not summary.rows:
        raise EmbedError(
            f"no audio file found in {' '.join(map(str, inputs_))} "
            f"(extensions: {' '.join(sorted(AUDIO))}); see {rejects_path(out)}"
        )
    return summary
