"""P3: reading a shard into torch batches vs a raw read of the same bytes.

Writes one shard of N 10 s windows (uncompressed mel column, as the pipeline writes it),
then, warm page cache, best of several runs:
  * raw: read the file's bytes and view the mel payload as a float16 torch tensor;
  * shard: dasheng_pipeline.features.shards.iter_batches → torch.from_numpy per batch (mel + valid_frames).
The figure is throughput(shard) / throughput(raw); goal ≥ 0.8.

    python benchmarks/p3_read.py [--rows 1024] [--batch 32]
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

from dasheng_pipeline.features import shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    # Arrow buffers are read-only; the loader's collate step copies them anyway.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard.parquet"
        writer = shards.ShardWriter(path, 64, 1001, {}, 256, "zstd")
        for i in range(args.rows):
            m = np.cumsum(rng.standard_normal((64, 1001)), axis=1).astype(np.float32) - 40
            writer.add(f"clip{i}", "bench", 0, 0.0, 1001, [], m)
        writer.close()
        nbytes = args.rows * 64 * 1001 * 2

        def raw():
            data = path.read_bytes()
            return torch.frombuffer(bytearray(data[:nbytes]), dtype=torch.float16).view(
                -1, 64, 1001
            )

        def shard():
            n = 0
            for batch in shards.iter_batches(path, args.batch):
                mel = torch.from_numpy(batch["mel"])
                valid = torch.from_numpy(batch["valid_frames"])
                n += mel.shape[0] + 0 * int(valid[0])
            assert n == args.rows

        best = {}
        for name, fn in (("raw", raw), ("shard", shard)) * args.repeats:
            start = time.perf_counter()
            fn()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
        mb = path.stat().st_size / 1e6
        print(f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}")
        print(f"shard: {args.rows} windows, {mb:.0f} MB")
        print("| path | MB/s | windows/s |")
        print("|---|---|---|")
        for name in ("raw", "shard"):
            print(f"| {name} | {mb / best[name]:,.0f} | {args.rows / best[name]:,.0f} |")
        print(f"ratio shard / raw: {best['raw'] / best['shard']:.2f}")


if __name__ == "__main__":
    main()
