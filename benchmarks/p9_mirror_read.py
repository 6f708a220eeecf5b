"""P9: a Hugging Face-style mirror (Parquet rows embedding FLAC bytes) → shards, against the same
audio read from local files.

Writes N clips of 10 s, 48 kHz stereo FLAC (a sine sweep plus noise, as AudioSet's mirror stores
its clips), once as files in a folder and once as the rows of a Parquet file (the ``datasets``
Audio layout), then times each path from source to shards, interleaved, best of several runs, in
both modes of ``audio.keep_audio``:

  * keep_audio false: the local chunk job checks the files, the mel job decodes the originals
    (48 kHz → 16 kHz) into shards; the hf_parquet chunk job stores each row's bytes as they came,
    the mel job decodes them (the fastest path of each);
  * keep_audio true (the default): the chunk job decodes and stores 16 kHz FLAC (hf_parquet: each
    row's bytes fed to ffmpeg's stdin, no temporary copies), the mel job reads those.

Reported: audio seconds per wall second of each path, and the ratio hf_parquet / local in each
mode (goal ≥ 0.8). All use ``audio.decode_threads`` 2 (the default).

    python benchmarks/p9_mirror_read.py [--clips 48] [--repeats 2]
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from dasheng_pipeline.common.audio import ffmpeg_exe
from dasheng_pipeline.features import mel
from dasheng_pipeline.sources import hf_parquet, local, mirror

REPO = Path(__file__).resolve().parent.parent
SECONDS = 10.0


def defaults(section: dict) -> dict:
    return {k: v["default"] for k, v in section["properties"].items() if "default" in v}


def make_clips(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True)
    out = []
    for i in range(n):
        path = folder / f"clip{i:05d}.flac"
        src = (
            f"aevalsrc='0.3*sin(2*PI*(200+{i * 7})*t*(1+t/4))|0.3*sin(2*PI*(300+{i * 5})*t)'"
            f":s=48000:d={SECONDS}"
        )
        cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y"]
        cmd += [
            "-f",
            "lavfi",
            "-i",
            src,
            "-f",
            "lavfi",
            "-i",
            f"anoisesrc=a=0.05:r=48000:d={SECONDS}:seed={i}",
        ]
        cmd += ["-filter_complex", "amix=inputs=2:normalize=0", "-ac", "2", str(path)]
        subprocess.run(cmd, check=True, capture_output=True)
        out.append(path)
    return out


def write_parquet(files: list[Path], path: Path) -> None:
    audio_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "video_id": [f.stem for f in files],
            "audio": pa.array(
                [{"bytes": f.read_bytes(), "path": f.name} for f in files], audio_type
            ),
        }
    )
    pq.write_table(table, path, row_group_size=16)


def features(schema: dict) -> dict:
    return {
        "mel": defaults(schema["properties"]["mel"]),
        "audio": defaults(schema["properties"]["audio"]),
        "shards": defaults(schema["properties"]["shards"]),
        "seed": 0,
    }


def run_local(work: Path, root: Path, schema: dict, keep_audio: bool) -> None:
    src = {
        **defaults(schema["$defs"]["local_source"]),
        "type": "local",
        "root": str(root),
        "chunk_size": 10**6,
    }
    audio_cfg = {**defaults(schema["properties"]["audio"]), "keep_audio": keep_audio}
    params = {
        "source": "bench",
        "source_cfg": src,
        "audio": audio_cfg,
        "seed": 0,
        "allow_outside_paths": True,
    }
    local.run_index(params, str(work / "index.json"))
    local.run_chunk(
        str(work / "index.json"), "00000", params, str(work / "m.json"), str(work / "audio")
    )
    mel.run_chunk(
        str(work / "m.json"),
        str(work / "shards"),
        str(work / "s.json"),
        features(schema) | {"audio": audio_cfg},
    )


def run_parquet(work: Path, parquet: Path, schema: dict, keep_audio: bool) -> None:
    src = {
        **defaults(schema["$defs"]["hf_parquet_source"]),
        "type": "hf_parquet",
        "path": str(parquet.parent),
        "id_column": "video_id",
    }
    params = {
        "source": "bench",
        "source_cfg": src,
        "files": [parquet.name],
        "audio": {**defaults(schema["properties"]["audio"]), "keep_audio": keep_audio},
        "seed": 0,
    }
    mirror.run_chunk(
        hf_parquet.items,
        "00000",
        params,
        str(work / "m.json"),
        str(work / "audio"),
        str(work / "dl"),
    )
    mel.run_chunk(
        str(work / "m.json"),
        str(work / "shards"),
        str(work / "s.json"),
        features(schema) | {"audio": params["audio"]},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    schema = yaml.safe_load((REPO / "config/schema.yaml").read_text())
    import logging

    logging.disable(logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = make_clips(tmp / "local", args.clips)
        (tmp / "mirror").mkdir()
        write_parquet(files, tmp / "mirror" / "train-00000.parquet")
        parquet = tmp / "mirror" / "train-00000.parquet"
        paths = {
            "local, keep_audio false": lambda w: run_local(w, tmp / "local", schema, False),
            "hf_parquet, keep_audio false": lambda w: run_parquet(w, parquet, schema, False),
            "local, keep_audio true": lambda w: run_local(w, tmp / "local", schema, True),
            "hf_parquet, keep_audio true": lambda w: run_parquet(w, parquet, schema, True),
        }
        best = {name: float("inf") for name in paths}
        for r in range(args.repeats):
            for name, fn in paths.items():
                work = tmp / f"work-{r}-{name.replace(' ', '_').replace(',', '')}"
                work.mkdir()
                start = time.perf_counter()
                fn(work)
                best[name] = min(best[name], time.perf_counter() - start)
                shutil.rmtree(work)
    audio_s = args.clips * SECONDS
    print(f"command: {' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}")
    print(f"{args.clips} clips of {SECONDS:g} s, 48 kHz stereo FLAC; best of {args.repeats}\n")
    print("| path | wall s | audio s per wall s |")
    print("|---|---|---|")
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.1f} | {audio_s / seconds:.0f} |")
    for mode in ("keep_audio false", "keep_audio true"):
        ratio = best[f"local, {mode}"] / best[f"hf_parquet, {mode}"]
        print(f"\nratio hf_parquet / local, {mode}: {ratio:.2f} (goal >= 0.8)")


if __name__ == "__main__":
    main()
