"""P5: MAE training throughput on CPU (samples/s and tokens/s) for tiny and base, and the
loader's throughput against what a training step consumes.

Everything runs in one process on synthetic shards written with the pipeline's own writer:
  * loader: dasheng_pipeline.training.loader.TrainBatches over the shards (Parquet read + shuffle buffer + collate);
  * step: forward + backward + optimiser step of the MAE on batches of 10 s windows.
The loader must outpace the step: the figure is loader samples/s ÷ step samples/s (> 1 means
the loader is not the bottleneck; with loader_workers > 0 it also runs in parallel).

    python benchmarks/p5_training.py [--sizes tiny base] [--steps 6] [--optimizer adamw8bit]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from dasheng_model.mae import MaskedAutoencoder
from dasheng_pipeline.features import shards
from dasheng_pipeline.training import loader
from dasheng_pipeline.training.train import make_optimizer

BATCH = {"tiny": 16, "base": 4}


def write_shards(folder: Path, n: int = 2, rows: int = 256) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for s in range(n):
        path = folder / f"s{s}.parquet"
        w = shards.ShardWriter(path, 64, 1001, {}, 256, "zstd")
        for r in range(rows):
            w.add(
                f"c{s}-{r}",
                "bench",
                0,
                0.0,
                1001,
                [],
                (rng.standard_normal((64, 1001)) * 10 - 40).astype(np.float32),
            )
        w.close()
        paths.append(str(path))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "base"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--optimizer", default="adamw8bit", choices=["adamw8bit", "adamw"])
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    torch.set_num_threads(2)
    print(f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}")
    with tempfile.TemporaryDirectory() as tmp:
        parts = loader.parts_of(write_shards(Path(tmp)))
        data = loader.TrainBatches(parts, 16, 24, seed=0, epoch=0, shuffle_buffer=256)
        start = time.perf_counter()
        n = sum(b["mel"].shape[0] for b in data)
        loader_rate = n / (time.perf_counter() - start)
        print(f"loader (1 stream, no worker processes): {loader_rate:,.0f} samples/s")
        print("| size | batch | s/step | samples/s | tokens/s | loader ÷ step |")
        print("|---|---|---|---|---|---|")
        for size in args.sizes:
            torch.manual_seed(0)
            mae = MaskedAutoencoder(size)
            opt = make_optimizer(
                mae.parameters(), {"optimizer": args.optimizer, "lr": 1e-4, "weight_decay": 0.01}
            )
            batch = next(
                iter(
                    loader.TrainBatches(parts, BATCH[size], 1, seed=0, epoch=0, shuffle_buffer=256)
                )
            )
            times = []
            for step in range(args.steps + 1):
                t = time.perf_counter()
                out = mae(
                    batch["mel"],
                    batch["valid_frames"],
                    generator=torch.Generator().manual_seed(step),
                )
                out.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if step:  # the first step warms up
                    times.append(time.perf_counter() - t)
            per_step = float(np.median(times))
            rate = BATCH[size] / per_step
            print(
                f"| {size} | {BATCH[size]} | {per_step:.3f} | {rate:,.1f} | {rate * 250:,.0f} | {loader_rate / rate:,.0f} |"
            )


if __name__ == "__main__":
    main()
