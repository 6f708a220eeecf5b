"""Demo source: a deterministic synthetic corpus (no network), the embedded default.

Clip ``i`` of a corpus with seed ``s`` and stream ``k`` (default 0) is drawn from
``numpy.random.default_rng([s, k, i])`` alone, so it is the same whatever the chunking or the
number of jobs. Families (the clip's label): tones, harmonic notes, chirps, coloured noise,
clicks, AM and FM sounds, and mixtures of those. Durations are uniform in [min_s, max_s], so
some clips span two 10 s windows.

The demo audio is itself the source (like a local corpus): it is always written as 16 kHz
FLAC, whatever ``audio.keep_audio`` says.

As a route of a corpus, a demo source generates only the clips the earlier routes did not
obtain. With ``mirror_share``, ``python -m dasheng_pipeline.sources.demo mirror`` writes a tiny
Hugging Face-style mirror of the first ``mirror_share`` of its clips (a Parquet file whose
``audio`` column embeds each clip's FLAC bytes, as the ``datasets`` library stores them) and the
corpus's ID list (all clips), so that the demo shows a route filling what a mirror lacks.
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


def _earlier(params: dict):
    """In a corpus: the IDs its earlier routes obtained (None outside a corpus)."""
    route = params.get("route")
    if not route:
        return None
    from dasheng_pipeline.sources import routes

    return routes.IdSet.from_tables(route.get("earlier", []))


def run_chunk(chunk: str, params: dict, out: str, audio_dir: str) -> None:
    src = params["source_cfg"]
    size, total = int(src["chunk_size"]), int(src["clips"])
    first = int(chunk) * size
    indices = range(first, min(first + size, total))
    stream = int(src["stream"])
    earlier = _earlier(params)
    if earlier is not None:
        wanted = [i for i in indices if clip_id(i, stream) not in earlier]
        skipped = {"obtained by an earlier route": len(indices) - len(wanted)}
        indices = wanted
    dest = Path(audio_dir)
    dest.mkdir(parents=True, exist_ok=True)
    atomic.clean_stale_temps(dest)
    rules = audio.ClipRules.from_config(params["audio"])
    clips = []
    from tqdm import tqdm

    for index in tqdm(
        indices, desc=f"demo chunk {chunk}", unit="clip", file=sys.stdout, mininterval=5
    ):
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
    extra = {"skipped": skipped} if earlier is not None else {}
    manifest.write_fetch(out, params, chunk, clips, audio.versions(), **extra)


def write_mirror(params: dict, parquet_out: str, ids_out: str) -> None:
    """The demo's own mirror: the first ``mirror_share`` of the clips as a Parquet file in the
    ``datasets`` Audio layout (FLAC bytes), and the ID list of all clips (``id,label``)."""
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    src = params["source_cfg"]
    total, stream, seed = int(src["clips"]), int(src["stream"]), int(params["seed"])
    n_mirror = int(round(float(src["mirror_share"]) * total))
    ids, audio_cells, labels, lines = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(total):
            samples, family = make_clip(
                seed, index, float(src["min_s"]), float(src["max_s"]), stream
            )
            cid = clip_id(index, stream)
            lines.append(f"{cid},{family}")
            if index >= n_mirror:
                continue
            flac = Path(tmp) / f"{cid}.flac"
            audio.encode_flac(samples, flac)
            ids.append(cid)
            audio_cells.append({"bytes": flac.read_bytes(), "path": flac.name})
            labels.append([family])
    audio_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "audio": pa.array(audio_cells, audio_type),
            "labels": pa.array(labels, pa.list_(pa.string())),
        }
    )
    with atomic.atomic_path(parquet_out) as tmp_path:
        pq.write_table(table, tmp_path, compression="zstd")
    with atomic.atomic_open(ids_out, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dasheng_pipeline.sources.demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("command", nargs="?", choices=("chunk", "mirror"), default="chunk")
    parser.add_argument("--params", required=True, help="JSON: source, source_cfg, audio, seed")
    parser.add_argument("--chunk", help="chunk: which chunk")
    parser.add_argument("--out", help="chunk: its manifest (JSON)")
    parser.add_argument("--audio-dir", help="chunk: the folder of its FLAC files")
    parser.add_argument("--parquet", help="mirror: the Parquet file to write")
    parser.add_argument("--ids", help="mirror: the ID list to write")
    args = parser.parse_args(argv)
    logs.setup()
    if args.command == "mirror":
        write_mirror(json.loads(args.params), args.parquet, args.ids)
    else:
        run_chunk(args.chunk, json.loads(args.params), args.out, args.audio_dir)


if __name__ == "__main__":
    main()
