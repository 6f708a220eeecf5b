"""PNG figures of the pipeline: matplotlib's Agg backend (no display needed), written atomically
with the provenance stamp in the PNG's ``Description`` text chunk (and no software tag, so the same
figure gives the same bytes)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dasheng_pipeline.common import atomic  # noqa: E402


def save_png(fig, path: str | Path, stamp: dict) -> None:
    """Write ``fig`` to ``path`` and close it."""
    path = Path(path)
    with atomic.atomic_path(path) as tmp:
        fig.savefig(
            tmp,
            format="png",
            dpi=120,
            bbox_inches="tight",
            metadata={
                "Description": json.dumps({"provenance": stamp}, sort_keys=True),
                "Software": None,
            },
        )
    plt.close(fig)
