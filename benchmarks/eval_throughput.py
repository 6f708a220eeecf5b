"""Evaluation throughput: embedding extraction (clips/s) per model size, and probe time per task.

Generates the demo tasks (dasheng_pipeline.evaluation.tasks.demo) in a temporary folder, then

1. runs ``dasheng_pipeline.evaluation.embeddings.run`` (ffmpeg decode, batching, forward pass, npz writes: the whole step a
   Snakemake ``embed`` job does) for the log-mel baseline and random-init ``tiny`` and ``base``
   encoders, reporting clips/s and audio seconds per wall second;
2. runs the HEAR MLP probe on every task's ``tiny`` embeddings with the demo config's probe
   settings (``config/config.yaml``) and, with ``--hear``, with HEAR's full protocol on the scene
   tasks too, reporting the wall time per task.

    python benchmarks/eval_throughput.py                 # CPU, 2 threads, the four synthetic tasks
    python benchmarks/eval_throughput.py --hear          # also the full HEAR grid on the scene tasks
    python benchmarks/eval_throughput.py --threads 16 --sizes tiny base 0.6B --batch 32
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dasheng_pipeline.evaluation import embeddings as extract  # noqa: E402
from dasheng_pipeline.evaluation.protocols import hear_mlp as probe  # noqa: E402
from dasheng_pipeline.evaluation.tasks import demo as demo_tasks  # noqa: E402
from dasheng_pipeline.evaluation.tasks import hear as hear_tasks  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def demo_probe_config() -> dict:
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    return cfg.get("evaluation", {}).get("probe", {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(demo_tasks.SYNTHETIC))
    parser.add_argument("--sizes", nargs="+", default=["tiny", "base"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--scale", type=float, default=1.0, help="demo task size multiplier")
    parser.add_argument(
        "--hear", action="store_true", help="also the full HEAR probe protocol on scene tasks"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows_embed, rows_probe = [], []
    with tempfile.TemporaryDirectory(prefix="eval-bench-") as tmp:
        tmp = Path(tmp)
        for name in args.tasks:
            demo_tasks.generate(name, tmp / "tasks" / name, seed=0, scale=args.scale)
        models = [("logmel", "logmel")] + [(s, f"random:{s}:0") for s in args.sizes]
        for name in args.tasks:
            task = hear_tasks.load_task(tmp / "tasks" / name)
            n = sum(len(task.clips(s)[0]) for s in task.splits)
            seconds = float(task.metadata["sample_duration"])
            for model, spec in models:
                out = tmp / "emb" / model / name
                t0 = time.perf_counter()
                extract.run(
                    tmp / "tasks" / name,
                    model,
                    spec,
                    {"batch_size": args.batch, "decode_threads": 2},
                    out,
                    threads=args.threads,
                )
                dt = time.perf_counter() - t0
                rows_embed.append((name, f"{seconds:g} s", n, model, n / dt, n * seconds / dt))
        settings = [("demo config", demo_probe_config())]
        if args.hear:
            settings.append(("HEAR protocol", {}))
        for label, cfg in settings:
            for name in args.tasks:
                task = hear_tasks.load_task(tmp / "tasks" / name)
                if label == "HEAR protocol" and task.is_event:
                    continue
                for model in ("logmel", "tiny"):
                    if not (tmp / "emb" / model / name).is_dir():
                        continue
                    t0 = time.perf_counter()
                    res = probe.run(
                        tmp / "tasks" / name,
                        tmp / "emb" / model / name,
                        probe.ProbeConfig.from_dict(cfg),
                        seed=0,
                        threads=args.threads,
                        stamp_section={"seed": 0, "probe": cfg},
                    )
                    dt = time.perf_counter() - t0
                    m = res["primary_metric"]
                    rows_probe.append(
                        (
                            name,
                            label,
                            model,
                            len(res["folds"]),
                            len(res["grid"]),
                            dt,
                            res["metrics"][m]["mean"],
                        )
                    )
    print(
        f"\n## Embedding extraction (CPU, {args.threads} threads, batch {args.batch}; decode + forward + write)\n"
    )
    print("| task | clip | clips | model | clips/s | audio s per wall s |")
    print("|---|---|---|---|---|---|")
    for name, clip, n, model, cps, rt in rows_embed:
        print(f"| {name} | {clip} | {n} | {model} | {cps:.1f} | {rt:.1f} |")
    print(f"\n## Probe time per task (CPU, {args.threads} threads)\n")
    print("| task | settings | embeddings | splits | grid points | wall s | primary score |")
    print("|---|---|---|---|---|---|---|")
    for name, label, model, splits, points, dt, score in rows_probe:
        print(f"| {name} | {label} | {model} | {splits} | {points} | {dt:.1f} | {score:.3f} |")


if __name__ == "__main__":
    main()
