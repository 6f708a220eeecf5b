"""Tag audio files with a classifier written by ``finetune``: ``dasheng-pipeline predict`` and :func:`predict`.

    from dasheng_pipeline.tools.predict import predict
    summary = predict(["new/"], "clf/", "tags.csv", top_k=3)

INPUT is handled as ``embed`` handles it (files, folders searched recursively, ``.txt``/``.csv``
lists; 16 kHz mono through ffmpeg). Each file is embedded the way the classifier was trained on
(the mean of its 25 Hz frames; a full-mode classifier brings its fine-tuned encoder), then scored:
softmax over the labels for a single-label classifier, a sigmoid per label for a multi-label one.

``OUT`` (CSV, written atomically at the end) has one row per file and rank, best first:
``path, rank, label, score`` (``rank`` 1..k, ``k`` = ``top_k`` or the number of labels if fewer).
With ``chunks``, one group of rows per 10.08 s window of the file (the windows the encoder runs
on, 252 frames each; the last one shorter): ``path, chunk, start_s, end_s, rank, label, score``.
Files that cannot be used go to ``OUT`` with ``.rejects.csv`` (path, reason, size, mtime_ns).
"""

from __future__ import annotations

import csv
import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dasheng_model.embed import FRAME_MS
from dasheng_model.encoder import MAX_TOKENS
from dasheng_pipeline.common import atomic, audio
from dasheng_pipeline.tools import classifier as clf
from dasheng_pipeline.tools import inputs
from dasheng_pipeline.tools.embed import embed_waveforms, rejects_path, write_rejects

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
    if out.suffix.lower() != ".csv":
        raise PredictError(f"--out {out}: expected a .csv file name")
    if top_k < 1:
        raise PredictError(f"--top-k {top_k}: expected at least 1")
    model, head, meta = clf.load(classifier, device, dtype)
    labels, multilabel = meta["labels"], bool(meta["multilabel"])
    k = min(top_k, len(labels))
    items, rejects = inputs.collect(inputs_)
    found = {r.path: r for r in rejects}
    summary = Summary(str(out))
    log.info(
        f"classifier {classifier} ({meta['mode']}, {len(labels)} labels, "
        f"{'multi' if multilabel else 'single'}-label) on {model.device}; {len(items)} files"
    )

    header = (
        ["path"] + (["chunk", "start_s", "end_s"] if chunks else []) + ["rank", "label", "score"]
    )
    rows: list[list] = []
    pending: list[tuple[inputs.Item, np.ndarray]] = []

    def run_pending() -> None:
        if not pending:
            return
        frames = embed_waveforms(model, [w for _, w in pending], batch_size)  # (T_i, D) each
        for (item, wave), f in zip(pending, frames):
            duration = wave.size / audio.SAMPLE_RATE
            pieces = f.split(MAX_TOKENS) if chunks else [f]
            x = torch.stack([p.mean(0) for p in pieces]).to(model.device)  # (chunks or 1, D)
            with torch.no_grad():
                p = clf.probabilities(head(x).float(), multilabel).cpu().numpy()
            for c, s in enumerate(p):
                where = (
                    [c, f"{c * CHUNK_S:.2f}", f"{min((c + 1) * CHUNK_S, duration):.2f}"]
                    if chunks
                    else []
                )
                rows.extend(
                    [item.path, *where, r, lab, f"{sc:.6f}"] for r, lab, sc in _top(s, labels, k)
                )
            summary.files += 1
            summary.audio_seconds += duration
        pending.clear()

    for item, samples, reason in inputs.load_all(
        items, threads=decode_threads, desc="predict", progress=progress
    ):
        if samples is None:
            found[item.path] = inputs.Reject(item.path, reason, item.size, item.mtime_ns)
        else:
            pending.append((item, samples))
            if len(pending) >= 4 * batch_size:
                run_pending()
    run_pending()

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic.write_bytes(out, buf.getvalue().encode("utf-8"))
    write_rejects(rejects_path(out), found)
    summary.rows, summary.rejected = len(rows), len(found)
    summary.seconds = time.perf_counter() - t0
    log.info(summary.line())
    if not items:
        raise PredictError(
            f"no audio file found in {' '.join(map(str, inputs_))}; see {rejects_path(out)}"
        )
    return summary
