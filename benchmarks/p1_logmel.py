"""P1: log-mel throughput (seconds of audio per CPU-second), batched path vs a per-clip loop.

Both compute the same features (dasheng_model.frontend.LogMel, top_db per window) on the same 10 s
windows, in one process with one torch thread; the figure is their ratio.

    python benchmarks/p1_logmel.py [--windows 64] [--batch 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import numpy as np
import torch

from dasheng_model.frontend import LogMel
from dasheng_pipeline.features import mel


def cpu_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    windowing = mel.Windowing(window_s=10.0, min_tail_s=1.0)
    logmel = LogMel().eval()
    rng = np.random.default_rng(0)
    pieces = [
        (rng.standard_normal(windowing.window_samples) * 0.1).astype(np.float32)
        for _ in range(args.windows)
    ]
    audio_s = args.windows * windowing.window_s

    def batched():
        for i in range(0, len(pieces), args.batch):
            mel.compute(logmel, pieces[i : i + args.batch], windowing)

    def loop():
        with torch.no_grad():
            for piece in pieces:
                logmel(torch.from_numpy(piece)[None]).numpy()

    loop()  # warm-up
    t_loop = cpu_seconds(loop, args.repeats)
    t_batch = cpu_seconds(batched, args.repeats)
    print(f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}")
    print("| path | audio s per CPU-s |")
    print("|---|---|")
    print(f"| per-clip loop | {audio_s / t_loop:,.0f} |")
    print(f"| batched ({args.batch} windows) | {audio_s / t_batch:,.0f} |")
    print(f"ratio batched / loop: {t_loop / t_batch:.2f}")


if __name__ == "__main__":
    main()
