"""P2: decode + resample + log-mel + Parquet write (the mel job) vs ffmpeg decode alone.

Makes N 10 s, 44.1 kHz stereo WAV files, then times in the same run (wall clock, 2 cores):
  * baseline: decoding every file to 16 kHz mono float32 with the project's ffmpeg path,
    with the same number of decodes in flight as the mel job uses (audio.decode_threads);
  * end to end: dasheng_pipeline.features.mel.run_chunk on a chunk manifest of those files (keep_audio off:
    the originals are decoded straight into the mel step), which writes the Parquet shard.
The figure is throughput(end to end) / throughput(decode alone); goal ≥ 0.7.

    python benchmarks/p2_end_to_end.py [--files 48] [--repeats 2]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dasheng_pipeline.common import atomic, audio, manifest
from dasheng_pipeline.features import mel

DEFAULTS = {
    "mel": {
        "sample_rate": 16000,
        "n_fft": 512,
        "win_length": 512,
        "hop_length": 160,
        "n_mels": 64,
        "f_min": 0,
        "f_max": 8000,
        "top_db": 120,
        "window_s": 10.0,
        "min_tail_s": 1.0,
        "batch_size": 16,
    },
    "audio": {
        "keep_audio": False,
        "min_duration_s": 0.1,
        "max_duration_s": 3600,
        "too_long": "truncate",
        "silence_dbfs": -90,
        "decode_errors": "reject",
        "decode_threads": 2,
    },
    "shards": {"row_group_size": 256, "compression": "zstd", "max_rows": 2048},
    "seed": 0,
}


def make_files(folder: Path, n: int) -> list[Path]:
    files = []
    for i in range(n):
        path = folder / f"clip{i:04d}.wav"
        subprocess.run(
            [
                audio.ffmpeg_exe(),
                "-nostdin",
                "-loglevel",
                "error",
                "-y",
                "-f",
                "lavfi",
                "-i",
                f"anoisesrc=d=10:c=pink:r=44100:a=0.3:s={i}",
                "-ac",
                "2",
                str(path),
            ],
            check=True,
        )
        files.append(path)
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = make_files(tmp, args.files)
        clips = [
            manifest.clip(
                f.name, "ok", audio=str(f), audio_offset_s=0.0, audio_duration_s=None, labels=[]
            )
            for f in files
        ]
        man = tmp / "chunk.json"
        atomic.write_json(
            man,
            {
                "stage": "fetch",
                "source": "bench",
                "chunk": "00000",
                "clips": clips,
                "summary": manifest.summary(clips),
                "provenance": {},
            },
        )
        threads = DEFAULTS["audio"]["decode_threads"]

        def decode_only():
            with cf.ThreadPoolExecutor(threads) as pool:
                list(pool.map(audio.decode, files))

        def end_to_end():
            mel.run_chunk(
                str(man), str(tmp / "shards"), str(tmp / "shard.json"), DEFAULTS, threads=1
            )

        timings = {"decode": [], "e2e": []}
        decode_only()
        for _ in range(args.repeats):
            for name, fn in (("decode", decode_only), ("e2e", end_to_end)):
                start = time.perf_counter()
                fn()
                timings[name].append(time.perf_counter() - start)
        audio_s = 10.0 * args.files
        t_dec, t_e2e = min(timings["decode"]), min(timings["e2e"])
        print(f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}")
        print("| path | audio s per wall s |")
        print("|---|---|")
        print(f"| ffmpeg decode alone ({threads} in flight) | {audio_s / t_dec:,.0f} |")
        print(f"| decode + resample + mel + Parquet | {audio_s / t_e2e:,.0f} |")
        print(f"ratio end-to-end / decode: {t_dec / t_e2e:.2f}")


if __name__ == "__main__":
    main()
