"""The pre-training loss curve: ``python -m dasheng_pipeline.training.curve --metrics CSV --out PNG``.

Reads a CSV with ``step`` or ``epoch``, ``train_loss`` and (optionally, empty on some rows)
``val_loss`` — the training stage's ``metrics.csv``, or any run's in that shape — and draws both.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from pathlib import Path

from dasheng_pipeline.common import logs, provenance
from dasheng_pipeline.common.figures import plt, save_png

log = logging.getLogger(__name__)


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def loss_curve(metrics_csv: str | Path, path: str | Path, stamp: dict) -> None:
    with open(metrics_csv, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        rows = list(reader)
    xcol = "step" if "step" in columns else "epoch" if "epoch" in columns else None
    if xcol is None or "train_loss" not in columns:
        raise ValueError(
            f"{metrics_csv}: expected columns 'step' or 'epoch' and 'train_loss' (optionally "
            f"'val_loss'), got {columns}"
        )
    fig, ax = plt.subplots(figsize=(6, 4))
    for col, style in (("train_loss", "-"), ("val_loss", "o-")):
        if col in columns:
            points = [
                (x, y)
                for r in rows
                if (x := _number(r[xcol])) is not None and (y := _number(r[col])) is not None
            ]
            if points:
                ax.plot(*zip(*points), style, ms=3, label=col.replace("_", " "))
    ax.set_xlabel(xcol)
    ax.set_ylabel("MAE loss (normalised MSE on masked tokens)")
    ax.set_title("Pre-training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    save_png(fig, path, stamp)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dasheng_pipeline.training.curve", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--metrics", required=True, help="CSV: step|epoch, train_loss, val_loss")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--params", default="{}", help="JSON: seed (for the provenance stamp)")
    args = parser.parse_args(argv)
    logs.setup()
    params = json.loads(args.params)
    with logs.one_line_errors():
        loss_curve(args.metrics, args.out, provenance.stamp(params, params.get("seed")))
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
