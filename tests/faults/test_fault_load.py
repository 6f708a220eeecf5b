"""Load: one mel job over 10 000 clips, through the DAG, with its memory sampled as it goes; and
``dasheng-pipeline embed --frames`` on one long recording against a short one.

The clips are demo audio (0.6–1 s each): 500 distinct clips from the demo generator, each hard-linked
20 times under its own name in a local corpus tree (``audio.keep_audio: false``, so the mel job
decodes all 10 000 files itself with ffmpeg). What is measured is the mel job's resident memory
against the number of clips it has done (read from its progress bar in the job log): it must stay
flat, since a chunk is written part by part and nothing per clip is kept but its manifest row.

The recordings loop the shared fixture's 61 s file (a lavfi tone without it) with ffmpeg: 10 minutes
and 2 hours, each embedded by the command line in a fresh process; its peak resident memory is the
kernel's high-water mark (``ru_maxrss`` of the waited child). The 10-hour ``base`` figure of the same
measurement is a benchmark (BENCHMARKS.md, P11)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import fault_util as fu
import psutil
import pytest

pytestmark = pytest.mark.slow

CLIPS = 10_000
DISTINCT = 500
EMBED_MINUTES = (10, 120)  # one recording each, embedded with --frames by the tiny encoder
MAX_EMBED_RATIO = 1.1  # peak RSS of the long one over the short one
CHECKPOINTS = (1000, 2000, 5000)
MAX_GROWTH_MIB = 100  # 10 kB per clip; a kept window is 128 kB


def _corpus(root: Path) -> None:
    from dasheng_pipeline.common import audio
    from dasheng_pipeline.sources import demo

    store = root.parent / "distinct"
    store.mkdir(parents=True)
    for i in range(DISTINCT):
        samples, _ = demo.make_clip(0, i, 0.6, 1.0)
        audio.encode_flac(samples, store / f"{i:03d}.flac")
    for n in range(CLIPS):
        folder = root / f"{n // 1000:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        os.link(store / f"{n % DISTINCT:03d}.flac", folder / f"clip{n:05d}.flac")


def _progress(log: Path) -> int:
    """Clips done so far, from the last tqdm update in the mel job's log."""
    try:
        text = log.read_text(errors="replace")
    except FileNotFoundError:
        return 0
    done = re.findall(rf"\| *(\d+)/{CLIPS} \[", text)
    return int(done[-1]) if done else 0


def test_mel_job_on_10000_clips_has_flat_memory(tmp_path, figures):
    work = tmp_path / "w"
    _corpus(work / "corpus")
    cfg = {
        "sources": {"load": {"type": "local", "root": "corpus", "chunk_size": CLIPS}},
        "audio": {"keep_audio": False, "decode_threads": 3},
        "shards": {"max_rows": 1000},
        "training": {"validation_sources": []},
        "evaluation": {"enabled": False},
    }
    log = work / fu.OUT / "logs/features/load/00000.log"
    proc = fu.start(work, cfg, "data")
    samples: list[tuple[int, int]] = []  # (clips done, RSS MiB) of the mel job
    t0 = time.monotonic()
    try:
        while proc.poll() is None:
            jobs = [
                p
                for p in fu.session_processes(proc.pid)
                if "dasheng_pipeline.features.mel" in fu.cmdline(p) and "bash" not in p.name()
            ]
            for job in jobs:
                try:
                    samples.append((_progress(log), job.memory_info().rss >> 20))
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.25)
    finally:
        fu.sweep(str(work))
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, (work / "snakemake.log").read_text()[-4000:]

    doc = fu.read_json(work / fu.OUT / "shards/load/00000.json")
    statuses = [c["status"] for c in doc["clips"]]
    ids = {c["clip_id"] for c in doc["clips"]}
    # Peak RSS up to each checkpoint while clips are being done, then over the whole job (its end
    # included: the last part's row group, the sha256 pass and the manifest of 10 000 rows).
    in_loop = [(done, rss) for done, rss in samples if done < CLIPS]
    peak_at = {n: max((rss for done, rss in in_loop if done <= n), default=0) for n in CHECKPOINTS}
    loop_peak = max((rss for _, rss in in_loop), default=0)
    job_peak = max((rss for _, rss in samples), default=0)
    growth = loop_peak - peak_at[CHECKPOINTS[0]]
    lost = CLIPS - statuses.count("ok")
    flat = growth < MAX_GROWTH_MIB
    figures.record(
        "load",
        f"mel job on {CLIPS} clips",
        tried=1,
        survived=int(lost == 0 and flat),
        lost=lost,
        peak_rss_mib=" / ".join(
            [*(f"{rss} by {n}" for n, rss in peak_at.items()), f"{loop_peak} by the last clip"]
        ),
        job_peak_mib=job_peak,
        growth_mib=growth,
        seconds=round(seconds),
    )
    raw = tmp_path.parent / "fault-load-rss.json"
    raw.write_text(
        json.dumps(
            {
                "clips": CLIPS,
                "samples": samples,
                "peak_at": peak_at,
                "loop_peak": loop_peak,
                "job_peak": job_peak,
            },
            indent=None,
        )
        + "\n"
    )
    figures.attach(raw)
    figures.attach(_plot(samples, tmp_path.parent / "fault-load-rss.png"))

    assert len(doc["clips"]) == len(ids) == CLIPS and lost == 0
    assert doc["rows"] == CLIPS and len(doc["shards"]) == CLIPS // 1000
    assert len(in_loop) > 20 and max(done for done, _ in in_loop) >= 9000, samples[-5:]
    # Flat: what the job holds after 10 000 clips is what it held after 1 000 (no growth per clip;
    # 10 000 windows would be 1.3 GB of float16 mel if they were kept).
    assert flat, (peak_at, loop_peak)


def _plot(samples: list[tuple[int, int]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    ax.plot(
        [d for d, _ in samples],
        [r for _, r in samples],
        ".",
        ms=3,
        label="mel job (sampled every 0.25 s)",
    )
    settled = max((r for d, r in samples if 0 < d <= CHECKPOINTS[0]), default=0)
    kept = 64 * 1001 * 2 / 2**20  # MiB of one float16 window
    ax.plot(
        [0, CLIPS],
        [settled, settled + CLIPS * kept],
        "--",
        color="grey",
        lw=1,
        label="if every window were kept",
    )
    ax.set_xlabel("clips done by the mel job")
    ax.set_ylabel("resident memory (MiB)")
    ax.set_ylim(0, max(settled + CLIPS * kept, max(r for _, r in samples)) * 1.1)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"mel job on {CLIPS} clips: memory stays flat")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _recording(folder: Path, minutes: int) -> Path:
    from helpers import SPEECH_COMMANDS

    from dasheng_pipeline.common.audio import ffmpeg_exe

    loop = SPEECH_COMMANDS / "_background_noise_" / "running_tap.wav"
    source = ["-stream_loop", "-1", "-i", str(loop)] if loop.is_file() else []
    source = source or ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=16000"]
    path = folder / f"{minutes}min.flac"
    cmd = [ffmpeg_exe(), "-nostdin", "-loglevel", "error", *source, "-t", str(60 * minutes)]
    subprocess.run([*cmd, "-ac", "1", "-ar", "16000", str(path)], check=True)
    return path


def _embed_peak_mib(audio: Path, out: Path) -> int:
    """Peak RSS (MiB) of ``embed --frames`` on ``audio`` in a fresh process."""
    cmd = [sys.executable, "-m", "dasheng_pipeline.cli", "embed", str(audio), "--frames", "-q"]
    cmd += ["--model", "random:tiny", "--out", str(out)]
    probe = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    done = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1]) >> 10


def test_embed_memory_does_not_grow_with_the_recordings_length(tmp_path, figures):
    peaks, frames = {}, {}
    t0 = time.monotonic()
    for minutes in EMBED_MINUTES:
        audio = _recording(tmp_path, minutes)
        out = tmp_path / f"{minutes}min.parquet"
        peaks[minutes] = _embed_peak_mib(audio, out)
        audio.unlink()
        from dasheng_pipeline.tools import read_embeddings

        frames[minutes] = int(read_embeddings(out).table.column("num_frames")[0].as_py())
    short, long = EMBED_MINUTES
    ratio = peaks[long] / peaks[short]
    figures.record(
        "load",
        f"embed --frames, one {long // 60} h recording against {short} min (tiny)",
        tried=1,
        survived=int(ratio <= MAX_EMBED_RATIO),
        peak_rss_mib=" / ".join(f"{peaks[m]} ({m} min)" for m in EMBED_MINUTES),
        ratio=round(ratio, 3),
        seconds=round(time.monotonic() - t0),
    )
    assert frames == {m: m * 60 * 25 for m in EMBED_MINUTES}  # every 40 ms frame, on disk
    assert ratio <= MAX_EMBED_RATIO, peaks
