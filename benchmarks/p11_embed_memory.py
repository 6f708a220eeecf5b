"""P11: peak memory of ``dasheng-pipeline embed --frames`` against the length of one recording.

Long recordings are made by looping the shared fixture's 61 s file (Speech Commands'
``_background_noise_/running_tap.wav``; a lavfi sine-and-noise source when the fixture is absent)
with ffmpeg into 16 kHz FLAC, one per length. Each is embedded alone by the command line in a
fresh process (a cold start, as a user runs it), whose ``/proc/<pid>/status`` is sampled every
0.5 s: the peak resident set (``VmHWM``), split into anonymous memory (``RssAnon``: what the
process allocates) and file pages (``RssFile``: mostly torch's shared libraries). ffmpeg runs as
a child process and is reported apart. The figure of merit is the ratio of the longest to the
shortest recording's peak: memory that grew with the length would show in it.

    python benchmarks/p11_embed_memory.py --model random:tiny --minutes 10 120
    python benchmarks/p11_embed_memory.py --model random:base --minutes 10 600   # the 10-hour case
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dasheng_pipeline.common.audio import ffmpeg_exe  # noqa: E402

SOURCE = "speech_commands_small/_background_noise_/running_tap.wav"


def long_recording(folder: Path, minutes: float) -> Path:
    """A FLAC of ``minutes`` made by looping the shared 61 s recording (or a lavfi source)."""
    path = folder / f"long-{minutes:g}min.flac"
    if path.is_file():
        return path
    shared = Path(os.environ.get("DASHENG_SHARED", "/work/shared")) / "fixtures" / SOURCE
    if shared.is_file():
        source = ["-stream_loop", "-1", "-i", str(shared)]
    else:
        source = ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=16000,volume=0.3"]
    seconds = f"{minutes * 60:g}"
    cmd = [ffmpeg_exe(), "-nostdin", "-loglevel", "error", *source, "-t", seconds]
    subprocess.run([*cmd, "-ac", "1", "-ar", "16000", str(path)], check=True)
    return path


def _status(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as fh:
        keys = ("VmHWM", "RssAnon", "RssFile")
        return {line.split(":")[0]: int(line.split()[1]) for line in fh if line.startswith(keys)}


def measure(audio: Path, out: Path, model: str, batch_size: int, dtype: str) -> dict:
    """Run ``embed --frames`` on one file and sample its memory until it exits."""
    cmd = [sys.executable, "-m", "dasheng_pipeline.cli", "embed", str(audio), "--frames", "-q"]
    cmd += ["--model", model, "--out", str(out), "--batch-size", str(batch_size), "--dtype", dtype]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd)
    peak = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0, "ffmpeg": 0}
    while proc.poll() is None:
        try:
            for key, value in _status(proc.pid).items():
                peak[key] = max(peak[key], value)
            kids = psutil.Process(proc.pid).children(recursive=True)
            peak["ffmpeg"] = max(peak["ffmpeg"], sum(k.memory_info().rss >> 10 for k in kids))
        except (FileNotFoundError, ProcessLookupError, psutil.Error):
            pass
        time.sleep(0.5)
    if proc.returncode != 0:
        raise SystemExit(f"embed failed ({proc.returncode}): {' '.join(cmd)}")
    return {k: v >> 10 for k, v in peak.items()} | {"seconds": round(time.monotonic() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="random:tiny")
    ap.add_argument("--minutes", type=float, nargs="+", default=[10.0, 120.0])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument(
        "--work", default=None, help="folder for the audio and outputs (default: a temporary one)"
    )
    ap.add_argument("--json", default=None, help="write the figures here too")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="p9-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for minutes in args.minutes:
        audio = long_recording(work, minutes)
        out = work / f"e-{minutes:g}min.parquet"
        for stale in work.glob(f"e-{minutes:g}min*"):
            subprocess.run(["rm", "-rf", str(stale)], check=True)
        row = {"minutes": minutes, **measure(audio, out, args.model, args.batch_size, args.dtype)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]["VmHWM"]
    print(f"\nmodel {args.model}, batch {args.batch_size}, {args.dtype}, --frames (MiB)")
    print(
        "| audio | peak RSS | of which anonymous | file pages | ffmpeg | ratio to the first | wall s |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['minutes']:g} min | {r['VmHWM']} | {r['RssAnon']} | {r['RssFile']} | {r['ffmpeg']} "
            f"| {r['VmHWM'] / base:.3f} | {r['seconds']} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
