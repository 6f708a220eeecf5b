"""Probe protocols on the same embeddings: HEAR's full protocol against shortened ones.

    .venv/bin/python benchmarks/p8_probe_protocols.py results/demo/eval [--models trained random logmel]
        [--tasks demo_pitch demo_timbre demo_noise demo_events] [--protocols hear demo old_demo]

Reads the embeddings and task folders of a finished evaluation (``<eval>/embeddings/<model>/<task>``,
``<eval>/tasks/<task>``), runs ``dasheng_pipeline.evaluation.protocols.hear_mlp.run`` with each protocol and prints, per
(model, task), the primary test score ×100 and the wall time, then each protocol's mean absolute
difference from HEAR's score, its largest one, and its total time as a ratio of HEAR's (same run,
same machine).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from dasheng_pipeline.evaluation.protocols import hear_mlp as probe

PROTOCOLS = {
    "hear": {},
    # the demo's protocol (config/config.yaml): HEAR's grid and stopping rule, 8 steps per epoch
    "demo": {"grid_points": 4, "steps_per_epoch": 8, "max_epochs": 100, "patience": 5},
    # the demo's protocol until issue 18: one optimiser step per epoch on these small tasks
    "old_demo": {"hidden_layers": [1], "grid_points": 2, "max_epochs": 150, "patience": 8},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("eval_dir")
    ap.add_argument("--models", nargs="+", default=["trained", "random", "logmel"])
    ap.add_argument(
        "--tasks", nargs="+", default=["demo_pitch", "demo_timbre", "demo_noise", "demo_events"]
    )
    ap.add_argument("--protocols", nargs="+", default=list(PROTOCOLS))
    ap.add_argument("--extra", default="{}", help="JSON: more protocols by name")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write every result here")
    args = ap.parse_args()
    protocols = {**PROTOCOLS, **json.loads(args.extra)}
    ev = Path(args.eval_dir)
    results = []
    print("| model | task | " + " | ".join(f"{p} score | {p} s" for p in args.protocols) + " |")
    print("|---|---|" + "---|---|" * len(args.protocols))
    for model in args.models:
        for task in args.tasks:
            cells = []
            for name in args.protocols:
                cfg = probe.ProbeConfig.from_dict(protocols[name])
                t0 = time.perf_counter()
                out = probe.run(
                    ev / "tasks" / task,
                    ev / "embeddings" / model / task,
                    cfg,
                    seed=0,
                    threads=args.threads,
                    stamp_section={"seed": 0, "probe": protocols[name]},
                )
                seconds = time.perf_counter() - t0
                score = out["metrics"][out["primary_metric"]]["mean"] * 100
                results.append(
                    {
                        "model": model,
                        "task": task,
                        "protocol": name,
                        "score": score,
                        "seconds": seconds,
                        "best": out["best_hparams"],
                    }
                )
                cells += [f"{score:.1f}", f"{seconds:.1f}"]
            print(f"| {model} | {task} | " + " | ".join(cells) + " |", flush=True)
    ref = {(r["model"], r["task"]): r for r in results if r["protocol"] == "hear"}
    hear_s = sum(r["seconds"] for r in ref.values())
    print("\n| protocol | mean abs diff from HEAR | largest | time / HEAR's |\n|---|---|---|---|")
    for name in args.protocols:
        rows = [r for r in results if r["protocol"] == name]
        if not ref:
            break
        d = [abs(r["score"] - ref[(r["model"], r["task"])]["score"]) for r in rows]
        print(
            f"| {name} | {np.mean(d):.1f} | {max(d):.1f} | {sum(r['seconds'] for r in rows) / hear_s:.2f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
