"""Tag audio files with a classifier written by ``finetune``: :func:`predict`, the
``dasheng-pipeline predict`` command (what it reads and writes: ``docs/cli/predict.md``).

Each file is embedded as the classifier was trained (the mean of its 25 Hz frames, per file or per
10.08 s window; a full-mode classifier brings its own encoder) and scored by the head.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dasheng_model.embed import FRAME_MS
from dasheng_model.encoder import MAX_TOKENS
from dasheng_pipeline.common import atomic, audio
from dasheng_pipeline.tools import classifier as clf
from dasheng_pipeline.tools import inputs
from dasheng_pipeline.tools.embed import Model, embed_waveforms, rejects_path, write_rejects

log = logging.getLogger(__name__)

CHUNK_S = MAX_TOKENS * FRAME_MS / 1000  # 10.08 s


class PredictError(ValueError):
    """A run that cannot start (bad arguments, no audio at all)."""


@dataclass
class Summary:
    out: str
    files: int = 0
    rows: int = 0
    rejected: int = 0
    seconds: float = 0.0
    audio_seconds: float = 0.0

    def line(self) -> str:
        return (
            f"{self.out}: tagged {self.files} files ({self.audio_seconds:.0f} s of audio) in {self.seconds:.1f} s, "
            f"{self.rows} rows; rejected {self.rejected}"
        )


def _top(scores: np.ndarray, labels: list[str], k: int) -> list[tuple[int, str, float]]:
    order = np.argsort(-scores, kind="stable")[:k]
    return [(r + 1, labels[i], float(scores[i])) for r, i in enumerate(order)]


def _check_args(out: Path, top_k: int) -> None:
    if out.suffix.lower() != ".csv":
        raise PredictError(f"--out {out}: expected a .csv file name")
    if top_k < 1:
        raise PredictError(f"--top-k {top_k}: expected at least 1")


@dataclass
class _Tagger:
    """Decoded files in, CSV rows out: embeds a batch of waveforms at a time and keeps the top k."""

    model: Model
    head: clf.Head
    labels: list[str]
    multilabel: bool
    k: int
    chunks: bool
    batch_size: int
    summary: Summary
    rows: list[list] = field(default_factory=list)
    pending: list[tuple[inputs.Item, np.ndarray]] = field(default_factory=list)

    @property
    def header(self) -> list[str]:
        where = ["chunk", "start_s", "end_s"] if self.chunks else []
        return ["path", *where, "rank", "label", "score"]

    def add(self, item: inputs.Item, samples: np.ndarray) -> None:
        self.pending.append((item, samples))
        if len(self.pending) >= 4 * self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        waves = [w for _, w in self.pending]
        frames = embed_waveforms(self.model, waves, self.batch_size)  # (T_i, D) each
        for (item, wave), f in zip(self.pending, frames):
            self._tag(item, wave.size / audio.SAMPLE_RATE, f)
        self.pending.clear()

    def _tag(self, item: inputs.Item, duration: float, frames: torch.Tensor) -> None:
        pieces = frames.split(MAX_TOKENS) if self.chunks else [frames]
        x = torch.stack([p.mean(0) for p in pieces]).to(self.model.device)  # (chunks or 1, D)
        with torch.no_grad():
            p = clf.probabilities(self.head(x).float(), self.multilabel).cpu().numpy()
        for c, s in enumerate(p):
            end = min((c + 1) * CHUNK_S, duration)
            where = [c, f"{c * CHUNK_S:.2f}", f"{end:.2f}"] if self.chunks else []
            self.rows.extend(
                [item.path, *where, r, lab, f"{sc:.6f}"]
                for r, lab, sc in _top(s, self.labels, self.k)
            )
        self.summary.files += 1
        self.summary.audio_seconds += duration


def predict(
    inputs_: list[str | Path],
    classifier: str | Path,
    out: str | Path,
    *,
    top_k: int = 5,
    chunks: bool = False,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "fp32",
    decode_threads: int = 2,
    progress: bool = True,
) -> Summary:
    """Top-k labels per file (or per 10.08 s chunk) of every audio file named by ``inputs_`` into ``out`` (CSV)."""
    t0 = time.perf_counter()
    out = Path(out)
    _check_args(out, top_k)
    model, head, meta = clf.load(classifier, device, dtype)
    labels, multilabel = meta["labels"], bool(meta["multilabel"])
    items, rejects = inputs.collect(inputs_)
    found = {r.path: r for r in rejects}
    summary = Summary(str(out))
    log.info(
        f"classifier {classifier} ({meta['mode']}, {len(labels)} labels, "
        f"{'multi' if multilabel else 'single'}-label) on {model.device}; {len(items)} files"
    )
    k = min(top_k, len(labels))
    tagger = _Tagger(model, head, labels, multilabel, k, chunks, batch_size, summary)
    for item, samples, reason in inputs.load_all(
        items, threads=decode_threads, desc="predict", progress=progress
    ):
        if samples is None:
            found[item.path] = inputs.Reject(item.path, reason, item.size, item.mtime_ns)
        else:
            tagger.add(item, samples)
    tagger.flush()
    atomic.write_csv(out, tagger.header, tagger.rows)
    write_rejects(rejects_path(out), found)
    summary.rows, summary.rejected = len(tagger.rows), len(found)
    summary.seconds = time.perf_counter() - t0
    log.info(summary.line())
    if not items:
        raise PredictError(
            f"no audio file found in {' '.join(map(str, inputs_))}; see {rejects_path(out)}"
        )
    return summary
