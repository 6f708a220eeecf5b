"""Demo source: a deterministic synthetic corpus (no network), the embedded default.

Clip ``i`` of a corpus with seed ``s`` and stream ``k`` (default 0) is drawn from
``numpy.random.default_rng([s, k, i])`` alone, so it is the same whatever the chunking or the
number of jobs. Families (the clip's label): tones, harmonic notes, chirps, coloured noise,
clicks, AM and FM sounds, and mixtures of those. Durations are uniform in [min_s, max_s], so
some clips span two 10 s windows.

The demo audio is itself the source (like a local corpus): it is always written as 16 kHz
FLAC, whatever ``audio.keep_audio`` says.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from dasheng_pipeline.common import atomic, audio, logs, manifest
from dasheng_pipeline.sources import synth

# The pre-training corpus's default random stream; the demo evaluation tasks use others.
CORPUS_STREAM = 0


def clip_id(index: int, stream: int = CORPUS_STREAM) -> str:
    return f"demo-{index:06d}" if stream == CORPUS_STREAM else f"demo{stream}-{index:06d}"


def make_clip(
    seed: int, index: int, min_s: float, max_s: float, stream: int = CORPUS_STREAM
) -> tuple[np.ndarray, str]:
    """Samples (float32, 16 kHz) and family of clip ``index``."""
    rng = np.random.default_rng([seed, stream, index])
    family = synth.FAMILIES[int(rng.integers(len(synth.FAMILIES)))]
    n = int(rng.uniform(min_s, max_s) * synth.SR)
    x = synth.normalise(synth.render(rng, family, n), -rng.uniform(1, 20))
    x = x + synth.noise_floor(rng, n)
    return x.astype(np.float32), family


def run_chunk(chunk: str, params: dict, out: str, audio_dir: str) -> None:
    src = params["source_cfg"]
    size, total = int(src["chunk_size"]), int(src["clips"])
    first = int(chunk) * size
    indices = range(first, min(first + size, total))
    dest = Path(audio_dir)
    dest.mkdir(parents=True, exist_ok=True)
    atomic.clean_stale_temps(dest)
    rules = audio.ClipRules.from_config(params["audio"])
    clips = []
    from tqdm import tqdm

    for index in tqdm(
        indices, desc=f"demo chunk {chunk}", unit="clip", file=sys.stdout, mininterval=5
    ):
        stream = int(src["stream"])
        samples, family = make_clip(
            int(params["seed"]), index, float(src["min_s"]), float(src["max_s"]), stream
        )
        cid = clip_id(index, stream)
        reason = audio.check_clip(samples, rules)
        if reason:
            clips.append(manifest.clip(cid, "rejected", reason, labels=[family]))
            continue
        path = dest / f"{cid}.flac"
        audio.encode_flac(samples, path)
        clips.append(
            manifest.clip(
                cid,
                "ok",
                audio=str(path),
                audio_offset_s=0.0,
                audio_duration_s=None,
                labels=[family],
                duration_s=round(samples.size / synth.SR, 6),
            )
        )
    manifest.write_fetch(out, params, chunk, clips, audio.versions())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dasheng_pipeline.sources.demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--chunk", required=True)
    parser.add_argument("--params", required=True, help="JSON: source, source_cfg, audio, seed")
    parser.add_argument("--out", required=True, help="chunk manifest (JSON)")
    parser.add_argument("--audio-dir", required=True)
    args = parser.parse_args(argv)
    logs.setup()
    run_chunk(args.chunk, json.loads(args.params), args.out, args.audio_dir)


if __name__ == "__main__":
    main()
