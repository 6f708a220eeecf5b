"""P7: ``dasheng-pipeline embed`` against a plain loop over the HEAR module, same files, same weights.

The baseline is what a user writes without the command: for each file, decode it (the same
ffmpeg path) and call ``hear.get_scene_embeddings`` on it alone. ``embed`` decodes ahead in threads
and batches 10 s windows of files of similar length. Both run in one process on the same generated
clips (1–30 s, 32 kHz stereo WAV, so decoding resamples and downmixes), in fp32 and in bf16
(the baseline under the same autocast), alternating, each timed ``--repeats`` times (median).

    python benchmarks/p7_embed_cli.py                      # 500 clips, tiny encoder
    python benchmarks/p7_embed_cli.py --clips 100 --size base
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dasheng_model import hear  # noqa: E402
from dasheng_pipeline.common.audio import decode  # noqa: E402
from dasheng_pipeline.tools.embed import Model, embed_files  # noqa: E402


def make_clips(folder: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        seconds = float(rng.uniform(1.0, 30.0))
        t = np.arange(int(seconds * 32000)) / 32000
        x = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t) + 0.05 * rng.standard_normal(
            t.size
        )
        pcm = (np.clip(np.stack([x, 0.5 * x], 1), -1, 1) * 32767).astype("<i2")
        path = folder / f"clip{i:04d}.wav"
        with wave.open(str(path), "wb") as w:
            w.setnchannels(2)
            w.setsampwidth(2)
            w.setframerate(32000)
            w.writeframes(pcm.tobytes())
        paths.append(path)
    return paths


def hear_loop(paths: list[Path], model, dtype: str) -> np.ndarray:
    out = []
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        for p in paths:
            wav = torch.from_numpy(decode(p))[None]
            out.append(hear.get_scene_embeddings(wav, model)[0].float().numpy())
    return np.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=500)
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = f"random:{args.size}"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "clips").mkdir()
        paths = make_clips(tmp / "clips", args.clips)
        audio_s = sum(wave.open(str(p)).getnframes() / 32000 for p in paths)
        model = hear.load_model(spec, device="cpu")
        times: dict[tuple[str, str], list[float]] = {}
        results = {}
        for r in range(args.repeats):
            for dtype in ("fp32", "bf16"):
                t0 = time.perf_counter()
                results[("hear loop", dtype)] = hear_loop(paths, model, dtype)
                times.setdefault(("hear loop", dtype), []).append(time.perf_counter() - t0)
                out = tmp / f"e-{dtype}-{r}.parquet"
                m = Model.load(spec, "cpu", dtype)
                t0 = time.perf_counter()
                embed_files([tmp / "clips"], m, out, batch_size=args.batch_size, progress=False)
                times.setdefault(("embed", dtype), []).append(time.perf_counter() - t0)
                import pyarrow.parquet as pq

                results[("embed", dtype)] = np.array(
                    pq.read_table(out).column("embedding").to_pylist()
                )
    print(f"# {shlex.join(sys.argv)}")
    print(
        f"{args.clips} clips, {audio_s:.0f} s of audio (1–30 s each, 32 kHz stereo WAV), {spec}, "
        f"{args.threads} threads, batch {args.batch_size}, median of {args.repeats}"
    )
    print(
        "| method | dtype | clips/s | × real time | ratio vs HEAR loop (same dtype) | clip cosine vs HEAR loop fp32 |"
    )
    print("|---|---|---|---|---|---|")
    ref = results[("hear loop", "fp32")]
    for dtype in ("fp32", "bf16"):
        base = statistics.median(times[("hear loop", dtype)])
        for method in ("hear loop", "embed"):
            t = statistics.median(times[(method, dtype)])
            e = results[(method, dtype)]
            cos = (e * ref).sum(1) / np.linalg.norm(e, axis=1) / np.linalg.norm(ref, axis=1)
            print(
                f"| {method} | {dtype} | {args.clips / t:.1f} | {audio_s / t:.0f} | {base / t:.2f} | "
                f"min {cos.min():.5f} |"
            )


if __name__ == "__main__":
    main()
