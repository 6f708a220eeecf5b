"""The pre-training loss curve: ``python -m pipeline.training.curve --metrics CSV --out PNG``.

Reads a CSV with ``step`` or ``epoch``, ``train_loss`` and (optionally, empty on some rows)
``val_loss`` — the training stage's ``metrics.csv``, or any run's in that shape — and draws both.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pipeline.common import logs, provenance
from pipeline.common.figures import plt, save_png

log = logging.getLogger(__name__)


def loss_curve(metrics_csv: str | Path, path: str | Path, stamp: dict) -> None:
    import pandas as pd

    df = pd.read_csv(metrics_csv)
    xcol = "step" if "step" in df.columns else "epoch" if "epoch" in df.columns else None
    if xcol is None or "train_loss" not in df.columns:
        raise ValueError(f"{metrics_csv}: expected columns 'step' or 'epoch' and 'train_loss' (optionally "
                         f"'val_loss'), got {list(df.columns)}")
    fig, ax = plt.subplots(figsize=(6, 4))
    for col, style in (("train_loss", "-"), ("val_loss", "o-")):
        if col in df.columns:
            part = df[[xcol, col]].apply(pd.to_numeric, errors="coerce").dropna()
            if len(part):
                ax.plot(part[xcol], part[col], style, ms=3, label=col.replace("_", " "))
    ax.set_xlabel(xcol)
    ax.set_ylabel("MAE loss (normalised MSE on masked tokens)")
    ax.set_title("Pre-training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    save_png(fig, path, stamp)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.training.curve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--metrics", required=True, help="CSV: step|epoch, train_loss, val_loss")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--params", default="{}", help="JSON: seed (for the provenance stamp)")
    args = parser.parse_args(argv)
    logs.setup()
    params = json.loads(args.params)
    try:
        loss_curve(args.metrics, args.out, provenance.stamp(params, params.get("seed")))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
