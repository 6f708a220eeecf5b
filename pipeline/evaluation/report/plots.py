"""Figures of the evaluation: ``python -m dasheng_pipeline.evaluation.report.plots``.

- ``domains``: grouped bars of the primary probe score per domain (Env / Speech / Music / Other and
  their average), one bar per model, as the paper's Table 4;
- ``tasks``: a radar of the primary probe score of every task, one polygon per model, like the
  paper's Figure 1 (bars when there are fewer than 3 tasks);
- ``quick_checks``: the quick checks' score against the training step, from the training's
  ``quick_checks.csv`` (:func:`dasheng_pipeline.common.quick_checks.quick_checks_curve`).

(The loss curve of the report is the training stage's own figure, ``python -m
dasheng_pipeline.training.curve``: the evaluation stage imports nothing of the training stage.)

PNG files, written atomically, with the provenance stamp in the PNG's ``Description`` text chunk.
Rendering uses matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from dasheng_pipeline.common import logs, provenance, quick_checks
from dasheng_pipeline.common.figures import plt, save_png
from dasheng_pipeline.evaluation.metrics import LOWER_IS_BETTER
from dasheng_pipeline.evaluation.report.results import DOMAIN_TITLES, DOMAINS, domain_averages

log = logging.getLogger(__name__)


def _read_scores(path: str | Path) -> list[dict]:
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["score"] = float(r["score"]) if r["score"] not in ("", None) else None
        r["primary"] = r["primary"] in ("True", "true", "1")
    return rows


def domain_bars(rows: list[dict], models: list[str], path: str | Path, stamp: dict) -> None:
    avgs = domain_averages(rows, models)
    groups = [d for d in (*DOMAINS, "other", "average") if any(d in avgs[m] for m in models)]
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(groups) + 2), 4))
    if not groups:
        ax.text(0.5, 0.5, "no probe scores", ha="center", va="center")
        ax.set_axis_off()
    else:
        width = 0.8 / max(1, len(models))
        x = np.arange(len(groups))
        for i, m in enumerate(models):
            vals = [avgs[m][g][0] * 100 if g in avgs[m] else np.nan for g in groups]
            bars = ax.bar(x + (i - (len(models) - 1) / 2) * width, vals, width, label=m)
            for b, v in zip(bars, vals):
                if not math.isnan(v):
                    ax.annotate(
                        f"{v:.1f}",
                        (b.get_x() + b.get_width() / 2, v),
                        ha="center",
                        va="bottom",
                        fontsize=7,
                    )
        ax.set_xticks(x, [DOMAIN_TITLES[g] for g in groups])
        ax.set_ylabel("primary probe score ×100")
        ax.set_ylim(0, 105)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.set_title("HEAR probe: mean primary score per domain")
        ax.grid(axis="y", alpha=0.3)
    save_png(fig, path, stamp)


def task_radar(rows: list[dict], models: list[str], path: str | Path, stamp: dict) -> None:
    prim = [r for r in rows if r["method"] == "probe" and r["primary"] and r["score"] is not None]
    tasks = sorted(
        {r["task"] for r in prim},
        key=lambda t: (next(r["domain"] for r in prim if r["task"] == t), t),
    )
    lookup = {(r["task"], r["model"]): r for r in prim}

    def value(t, m):
        r = lookup.get((t, m))
        if r is None:
            return np.nan
        return (1 - r["score"]) * 100 if r["metric"] in LOWER_IS_BETTER else r["score"] * 100

    if len(tasks) >= 3:
        fig = plt.figure(figsize=(6.5, 6))
        ax = fig.add_subplot(projection="polar")
        angles = np.linspace(0, 2 * np.pi, len(tasks), endpoint=False)
        for m in models:
            vals = np.array([value(t, m) for t in tasks])
            ax.plot(
                np.append(angles, angles[0]), np.append(vals, vals[0]), marker="o", ms=3, label=m
            )
            ax.fill(
                np.append(angles, angles[0]), np.nan_to_num(np.append(vals, vals[0])), alpha=0.08
            )
        ax.set_xticks(angles, tasks, fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_rlabel_position(90)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.05, 1.05))
        ax.set_title("Primary probe score per task (×100)", pad=20)
    else:
        fig, ax = plt.subplots(figsize=(5, 4))
        width = 0.8 / max(1, len(models))
        x = np.arange(len(tasks))
        for i, m in enumerate(models):
            ax.bar(
                x + (i - (len(models) - 1) / 2) * width,
                [value(t, m) for t in tasks],
                width,
                label=m,
            )
        ax.set_xticks(x, tasks)
        ax.set_ylim(0, 105)
        ax.set_ylabel("primary probe score ×100")
        ax.legend(fontsize=8)
        ax.set_title("Primary probe score per task")
    save_png(fig, path, stamp)


def main(argv: list[str] | None = None) -> None:
    parser = logs.entry_parser("dasheng_pipeline.evaluation.report.plots", __doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("scores", help="domain bars and task radar from scores.csv")
    s.add_argument("--scores", required=True)
    s.add_argument("--domains", required=True, help="output PNG")
    s.add_argument("--tasks", required=True, help="output PNG")
    s.add_argument("--params", required=True, help="JSON: seed, models (order)")
    qc = sub.add_parser("quick_checks", help="quick checks' score vs step (quick_checks.csv)")
    qc.add_argument("--csv", required=True)
    qc.add_argument("--out", required=True)
    qc.add_argument("--params", required=True, help="JSON: seed")
    args = parser.parse_args(argv)
    logs.setup()
    params = json.loads(args.params)
    stamp = provenance.stamp(params, params["seed"])
    if args.cmd == "quick_checks":
        quick_checks.quick_checks_curve(args.csv, args.out, stamp)
        return
    rows = _read_scores(args.scores)
    models = list(params["models"] or dict.fromkeys(r["model"] for r in rows))
    domain_bars(rows, models, args.domains, stamp)
    task_radar(rows, models, args.tasks, stamp)
    log.info("wrote %s and %s", args.domains, args.tasks)


if __name__ == "__main__":
    main()
