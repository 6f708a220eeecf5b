"""Layer-wise probe: ``python -m dasheng_pipeline.evaluation.report.layers {score,table}``.

- ``score``: one model on one quick set (``dasheng_pipeline.evaluation.tasks.quick_sets``): the clip
  embeddings of every block (``dasheng_model.embed.embed_layers``) scored with the quick checks'
  k-NN and linear probe (:mod:`dasheng_pipeline.common.quick_checks`, as during pre-training); the
  log-mel baseline has one "layer" (0: the clip's mean log-mel); a HEAR module has none (no rows).
  → JSON.
- ``table``: every score JSON → ``layers.csv`` (model, task, method, layer, score),
  ``layers.md`` (per task: one row per layer, one column per model and method) and
  ``layers.png`` (per task: score against depth, one line per model).

This is the quick protocol (a linear read-out on clip means, the task's first split), not the
HEAR probe: it shows where in the network a property is linearly available, and how that moves
with training. The paper's tables use the last layer and the HEAR probe (``protocols``).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from dasheng_pipeline.common import atomic, logs, provenance
from dasheng_pipeline.common.figures import plt, save_png
from dasheng_pipeline.common.quick_checks import (
    METHODS,
    layer_scores,
    load_quick_set,
    logmel_features,
    quick_scores,
)
from dasheng_pipeline.evaluation.embeddings import EncoderEmbedder, LogMelEmbedder, build_embedder

log = logging.getLogger(__name__)

FIELDS = ["model", "task", "method", "layer", "score"]


def score(quick: str | Path, model_name: str, spec: dict, seed: int, k: int) -> dict:
    """Every block of one model scored on one quick set (rows: model, task, method, layer, score)."""
    task = load_quick_set(quick)
    embedder = build_embedder({**spec, "layer": None}, seed)  # every block is scored
    if isinstance(embedder, EncoderEmbedder):
        rows = layer_scores(embedder.encoder, task, k, "all")
    elif isinstance(embedder, LogMelEmbedder):
        rows = [
            {"task": task.name, "method": m, "layer": 0, "score": s}
            for m, s in quick_scores(logmel_features(task), task.label, task.train, k).items()
        ]
    else:
        log.info(f"model {model_name}: {embedder.description} has no layers to score")
        rows = []
    rows = [{"model": model_name, **r} for r in rows]
    for r in rows:
        log.info(f"{model_name}/{task.name} layer {r['layer']} {r['method']}: {r['score']:.4f}")
    return {
        "model": model_name,
        "task": task.name,
        "n_train": int(task.train.sum()),
        "n_test": int((~task.train).sum()),
        "rows": rows,
        "provenance": provenance.stamp({"model": spec, "task": task.name, "k": k}, seed),
    }


def table(inputs: list[str], out_dir: str | Path, plot: str | Path, seed: int) -> list[dict]:
    """Every score JSON → ``layers.csv``, ``layers.md`` and the plot."""
    rows = [r for path in inputs for r in json.loads(Path(path).read_text())["rows"]]
    out_dir = Path(out_dir)
    stamp = provenance.stamp({"inputs": sorted(Path(p).name for p in inputs)}, seed)
    with atomic.atomic_open(out_dir / "layers.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS + ["config_hash", "git_sha"])
        writer.writeheader()
        for r in rows:
            writer.writerow(
                {
                    **{f: r[f] for f in FIELDS},
                    "score": f"{r['score']:.6f}",
                    "config_hash": stamp["config_hash"],
                    "git_sha": stamp["git_sha"],
                }
            )
    models = list(dict.fromkeys(r["model"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    lines = [
        "# Layer-wise probe (quick protocol)",
        "",
        "Top-1 accuracy (%) of a standardised logistic regression (linear) and a cosine 10-NN (knn) on "
        "each block's clip means, trained on the task's first split's train + valid clips, tested on its "
        "test clips. Layer 0 is the log-mel baseline. The paper's tables use the last layer and the HEAR probe.",
        "",
    ]
    for task in tasks:
        cols = [
            (m, meth)
            for m in models
            for meth in METHODS
            if any(r["model"] == m and r["task"] == task for r in rows)
        ]
        layers = sorted({int(r["layer"]) for r in rows if r["task"] == task})
        lines += [
            f"## {task}",
            "",
            "| layer | " + " | ".join(f"{m} {meth}" for m, meth in cols) + " |",
            "|---" * (len(cols) + 1) + "|",
        ]
        for layer in layers:
            cells = []
            for m, meth in cols:
                v = [
                    r["score"]
                    for r in rows
                    if (r["model"], r["task"], r["method"], int(r["layer"]))
                    == (m, task, meth, layer)
                ]
                cells.append(f"{v[0] * 100:.1f}" if v else "")
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        lines.append("")
    atomic.write_bytes(out_dir / "layers.md", "\n".join(lines).encode("utf-8"))
    _plot(rows, models, tasks, plot, stamp)
    return rows


def _plot(
    rows: list[dict], models: list[str], tasks: list[str], path: str | Path, stamp: dict
) -> None:
    n = max(1, len(tasks))
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for i, m in enumerate(models):
            for meth, style in zip(METHODS, ("--", "-")):
                pts = sorted(
                    (int(r["layer"]), r["score"] * 100)
                    for r in rows
                    if (r["model"], r["task"], r["method"]) == (m, task, meth)
                )
                if len(pts) == 1 and pts[0][0] == 0:  # the log-mel baseline: a reference line
                    ax.axhline(pts[0][1], ls=style, color=f"C{i}", lw=1, label=f"{m} {meth}")
                elif pts:
                    ax.plot(
                        [p for p, _ in pts],
                        [v for _, v in pts],
                        style,
                        marker="o",
                        ms=3,
                        color=f"C{i}",
                        label=f"{m} {meth}",
                    )
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("block")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-1 accuracy (%)")
    axes[0][-1].legend(fontsize=6)
    fig.suptitle("Layer-wise probe (linear solid, k-NN dashed)", fontsize=10)
    save_png(fig, path, stamp)


def main(argv: list[str] | None = None) -> None:
    parser = logs.entry_parser("dasheng_pipeline.evaluation.report.layers", __doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("score", help="one model on one quick set → JSON")
    s.add_argument(
        "--quick",
        required=True,
        help=".npz from python -m dasheng_pipeline.evaluation.tasks.quick_sets",
    )
    s.add_argument("--model", required=True)
    s.add_argument("--spec", required=True, help="JSON model spec (as for the embeddings)")
    s.add_argument("--params", required=True, help="JSON: seed, k")
    s.add_argument("--out", required=True)
    s.add_argument("--threads", type=int, default=1)
    t = sub.add_parser("table", help="score JSONs → layers.csv, layers.md, layers.png")
    t.add_argument("--inputs", nargs="+", required=True)
    t.add_argument("--out-dir", required=True)
    t.add_argument("--params", required=True, help="JSON: seed")
    t.add_argument("--plot", required=True, help="layers.png to write")
    args = parser.parse_args(argv)
    logs.setup()
    params = json.loads(args.params)
    seed = int(params["seed"])
    with logs.one_line_errors():
        if args.cmd == "score":
            import torch

            torch.set_num_threads(max(1, args.threads))
            atomic.write_json(
                args.out,
                score(args.quick, args.model, json.loads(args.spec), seed, int(params["k"])),
            )
        else:
            table(args.inputs, args.out_dir, args.plot, seed)


if __name__ == "__main__":
    main()
