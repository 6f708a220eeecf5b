"""P6: Snakemake builds the DAG of an ACAV100M-sized list (95 M IDs) quickly.

Generates a list of 95 M distinct YouTube-like IDs (one per line, 1.1 GB), writes a config like
config/acav100m.yaml around it, and times `snakemake --dry-run all` (and `data`). The baseline,
measured in the same run, is the same dry-run on a one-row list: Snakemake's fixed cost (start-up,
parsing, config validation). Goal: under 15 s for the big list.

    python benchmarks/p6_dag.py [--ids 95000000] [--chunk-size 40000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
ALPHABET = np.frombuffer(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", dtype=np.uint8
)


def write_ids(path: Path, n: int, step: int = 5_000_000) -> None:
    """n distinct 11-character IDs (base-64 digits of the row number), one per line."""
    with open(path, "wb") as fh:
        for start in range(0, n, step):
            v = np.arange(start, min(n, start + step), dtype=np.int64)
            out = np.empty((v.size, 12), dtype=np.uint8)
            for k in range(11):
                out[:, 10 - k] = ALPHABET[v % 64]
                v //= 64
            out[:, 11] = 10
            fh.write(out.tobytes())


def dry_run(folder: Path, config: dict, target: str) -> tuple[float, int]:
    cfg = folder / f"config-{target}.yaml"
    cfg.write_text(yaml.safe_dump(config))
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-s",
            str(REPO / "Snakefile"),
            "-d",
            str(folder),
            "--configfile",
            str(cfg),
            "--dry-run",
            target,
        ],
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    total = re.search(r"^total\s+(\d+)", proc.stdout, re.M)
    return seconds, int(total.group(1)) if total else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ids", type=int, default=95_000_000)
    parser.add_argument("--chunk-size", type=int, default=40_000)
    parser.add_argument(
        "--keep", type=Path, default=None, help="folder to keep the generated list in"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        ids = folder / "acav_ids.txt"
        if not ids.exists() or ids.stat().st_size != 12 * args.ids:
            write_ids(ids, args.ids)
        (folder / "one.txt").write_bytes(b"AAAAAAAAAAA\n")
        config = {
            "out_dir": "results/p6",
            "training": {"validation_sources": ["acav100m"]},
            "evaluation": {"enabled": False},
            "sources": {
                "acav100m": {
                    "type": "youtube",
                    "format": "acav100m",
                    "list": str(ids),
                    "chunk_size": args.chunk_size,
                    "download_threads": 8,
                }
            },
        }
        small = {
            **config,
            "sources": {
                "acav100m": {**config["sources"]["acav100m"], "list": str(folder / "one.txt")}
            },
        }
        rows = []
        for target in ("all", "data"):
            base, base_jobs = dry_run(folder, small, target)
            big, big_jobs = dry_run(folder, config, target)
            rows.append((target, base, base_jobs, big, big_jobs))
    print(f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(f"list: {args.ids:,} IDs, chunk_size {args.chunk_size:,}")
    print("| target | one-row list: s (jobs) | 95 M list: s (jobs) | ratio | goal |")
    print("|---|---|---|---|---|")
    for target, base, base_jobs, big, big_jobs in rows:
        print(
            f"| {target} | {base:.1f} ({base_jobs}) | {big:.1f} ({big_jobs:,}) | {big / base:.1f}× | "
            f"{'met' if big < 15 else 'missed'} (< 15 s) |"
        )


if __name__ == "__main__":
    main()
