"""P10: Snakemake builds the DAG of an AudioSet-sized Hugging Face mirror index quickly.

Writes a snapshot folder of F Parquet files (default 2 000) of R rows each (default 1 000: 2 M rows
in all, AudioSet's size), metadata only (each row an ID and an empty Audio cell), a config whose
source is that snapshot (hf_parquet, ``include: ["data/*.parquet"]``, ``files_per_chunk`` as given)
and times ``snakemake --dry-run data``. With ``--with-routes`` the config is AudioSet's: a corpus
whose ID list has all 2 M IDs, routes [the mirror, youtube]. The baseline, measured in the same run,
is the same dry-run on a one-file mirror: Snakemake's fixed cost. Goal: under 15 s.

    python benchmarks/p10_mirror_dag.py [--files 2000] [--rows 1000] [--files-per-chunk 1] [--with-routes]
"""

from __future__ import annotations

import argparse
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parent.parent
AUDIO = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def write_snapshot(root: Path, files: int, rows: int) -> list[str]:
    (root / "data").mkdir(parents=True)
    ids = []
    for f in range(files):
        part = [f"{f:05d}_{r:05d}" for r in range(rows)]  # 11 characters, as YouTube IDs
        table = pa.table(
            {
                "video_id": pa.array(part, pa.string()),
                "audio": pa.array([{"bytes": b"", "path": ""}] * rows, AUDIO),
            }
        )
        pq.write_table(table, root / f"data/unbal_train-{f:05d}.parquet")
        ids += part
    return ids


def config(root: Path, per_chunk: int, listing: Path | None) -> dict:
    sources = {
        "as_hf": {
            "type": "hf_parquet",
            "path": str(root),
            "include": ["data/*.parquet"],
            "id_column": "video_id",
            "files_per_chunk": per_chunk,
        }
    }
    cfg = {
        "sources": sources,
        "training": {"validation_sources": ["as_hf"]},
        "evaluation": {"enabled": False},
    }
    if listing is not None:
        sources["as_yt"] = {
            "type": "youtube",
            "list": str(listing),
            "format": "acav100m",
            "chunk_size": 2000,
        }
        cfg["corpora"] = {
            "as": {"list": str(listing), "format": "acav100m", "routes": ["as_hf", "as_yt"]}
        }
    return cfg


def dry_run(folder: Path, cfg: dict) -> tuple[float, int, float]:
    """(wall s, jobs, CPU s): CPU time is what a busy machine does not inflate."""
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(folder)]
    cmd += ["--configfile", str(path), "--dry-run", "data"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    total = re.search(r"^total\s+(\d+)", proc.stdout, re.M)
    return seconds, int(total.group(1)) if total else 0, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--files-per-chunk", type=int, default=1)
    parser.add_argument("--with-routes", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small, big = tmp / "small", tmp / "big"
        ids_small = write_snapshot(small / "snap", 1, args.rows)
        ids_big = write_snapshot(big / "snap", args.files, args.rows)
        lists = {}
        for name, ids in (("small", ids_small), ("big", ids_big)):
            if args.with_routes:
                lists[name] = tmp / name / "ids.csv"
                lists[name].write_text("".join(f"{i}\n" for i in ids))  # acav100m: one ID per line
        runs = {}
        for name in ("small", "big"):
            cfg = config(tmp / name / "snap", args.files_per_chunk, lists.get(name))
            runs[name] = dry_run(tmp / name, cfg)
    print(f"command: {' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}")
    small, big = runs["small"], runs["big"]
    print(f"files_per_chunk {args.files_per_chunk}; routes: {args.with_routes}")
    print("| mirror | wall s | CPU s | jobs |")
    print("|---|---|---|---|")
    print(
        f"| 1 file x {args.rows} rows (baseline) | {small[0]:.1f} | {small[2]:.1f} | {small[1]} |"
    )
    print(f"| {args.files} files x {args.rows} rows | {big[0]:.1f} | {big[2]:.1f} | {big[1]:,} |")
    goal = "met" if big[0] < 15 else "NOT met"
    print(
        f"ratio {big[0] / small[0]:.1f}x (wall), {big[2] / small[2]:.1f}x (CPU); goal < 15 s: {goal}"
    )


if __name__ == "__main__":
    main()
