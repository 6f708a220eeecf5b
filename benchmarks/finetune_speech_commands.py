"""``finetune`` and ``predict`` on the Speech Commands fixture: held-out accuracy against chance, and
wall time against one embedding pass over the same files (the baseline, measured in the same run:
it fills a temporary embedding cache, which the frozen modes then share, so their time is the
training alone).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/finetune_speech_commands.py [--model SPEC]

The model: ``--model``, else the demo's encoder (``results/demo/training/encoder.safetensors``) when
the demo has run, else ``random:tiny``. Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dasheng_pipeline.tools.embed import Model  # noqa: E402
from dasheng_pipeline.tools.finetune import finetune, read_data  # noqa: E402
from dasheng_pipeline.tools.finetune.features import frozen_features  # noqa: E402
from dasheng_pipeline.tools.predict import predict  # noqa: E402

FIXTURE = (
    Path(os.environ.get("DASHENG_SHARED", ROOT.parent / "shared"))
    / "fixtures"
    / "speech_commands_small"
)
DEMO = ROOT / "results" / "demo" / "training" / "encoder.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEMO) if DEMO.is_file() else "random:tiny")
    parser.add_argument("--data", default=str(FIXTURE))
    args = parser.parse_args()
    model = Model.load(args.model)
    data = read_data(args.data)
    files = [e.item.path for e in data.examples]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        frozen_features(data, model, 8, False, tmp / "cache")  # finetune's default batch size
        base = time.perf_counter() - t0
        print(
            f"model {args.model}; {len(files)} clips; baseline: one embedding pass {base:.1f} s\n"
        )
        print(
            "| mode | train/valid/test clips | test accuracy | chance | accuracy / chance "
            "| wall s (embeddings cached) | wall / embedding pass |"
        )
        print("|---|---|---|---|---|---|---|")
        classifier = None
        for mode in ("linear", "mlp", "full"):
            out = tmp / mode
            t0 = time.perf_counter()
            r = finetune(
                args.data, model, out, mode=mode, seed=0, progress=False, cache_dir=tmp / "cache"
            )
            assert r.embedded == 0, "the frozen modes found the baseline's embeddings"
            wall = time.perf_counter() - t0
            classifier = out if mode == "mlp" else classifier
            counts = json.loads((out / "metrics.json").read_text())["folds"][0]["counts"]
            print(
                f"| {mode} | {counts['train']}/{counts['valid']}/{counts['test']} | {r.test:.3f} "
                f"| {r.chance:.3f} | {r.test / r.chance:.1f} | {wall:.1f} | {wall / base:.2f} |"
            )
        probe = files[:: max(1, len(files) // 8)][:8]
        long = sorted(Path(args.data).glob("_*/*.wav"))
        t0 = time.perf_counter()
        s = predict(
            probe + [str(p) for p in long],
            classifier,
            tmp / "tags.csv",
            top_k=3,
            chunks=True,
            progress=False,
        )
        wall = time.perf_counter() - t0
        print(
            f"\npredict --chunks --top-k 3 with the mlp classifier: {s.files} files ({s.audio_seconds:.0f} s of "
            f"audio) → {s.rows} rows in {wall:.1f} s (loading the encoder included)"
        )


if __name__ == "__main__":
    main()
