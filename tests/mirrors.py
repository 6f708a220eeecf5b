"""Test corpora as the mirrors ship them, made with the project's ffmpeg: Parquet files whose rows
embed FLAC / MP3 bytes (the ``datasets`` Audio layout, 48 kHz stereo), WebDataset tar shards
(``<key>.flac`` + ``<key>.json``), tar.gz archives of MP4 video clips, tar archives of MP3s."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dasheng_pipeline.common.audio import ffmpeg_exe

AUDIO_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def encoded(
    fmt: str,
    seconds: float = 1.5,
    freq: float = 440.0,
    sample_rate: int = 48000,
    channels: int = 2,
    video: bool = False,
) -> bytes:
    """A sine tone encoded by ffmpeg as ``fmt`` (flac, mp3, wav, mp4), as bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"clip.{fmt}"
        inputs = [
            "-f",
            "lavfi",
            "-i",
            f"sine=frequency={freq}:sample_rate={sample_rate}:duration={seconds}",
        ]
        if video:
            inputs = [
                "-f",
                "lavfi",
                "-i",
                f"testsrc=size=64x48:rate=10:duration={seconds}",
                *inputs,
            ]
        cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *inputs]
        cmd += ["-ac", str(channels), "-shortest", str(out)]
        subprocess.run(cmd, check=True, capture_output=True)
        return out.read_bytes()


def clip_freq(i: int) -> float:
    """Clip i's tone (distinct per clip, so that a test can tell which clip it decoded)."""
    return 300.0 + 50.0 * i


def parquet_mirror(
    root: Path,
    rows: list[dict],
    files: int = 2,
    name: str = "data/train-{i:05d}-of-{n:05d}.parquet",
) -> list[str]:
    """Write ``rows`` ({"id", "audio" bytes or None, "labels", "path"}) over ``files`` Parquet files
    in the Audio layout; returns their paths relative to ``root``."""
    per = -(-len(rows) // files)
    names = []
    for i in range(files):
        part = rows[i * per : (i + 1) * per]
        rel = name.format(i=i, n=files)
        table = pa.table(
            {
                "video_id": pa.array([r["id"] for r in part], pa.string()),
                "audio": pa.array(
                    [{"bytes": r["audio"], "path": r.get("path", f"{r['id']}.flac")} for r in part],
                    AUDIO_TYPE,
                ),
                "labels": pa.array([r.get("labels", []) for r in part], pa.list_(pa.string())),
            }
        )
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, root / rel, row_group_size=4)
        names.append(rel)
    return names


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tf.addfile(info, io.BytesIO(data))


def wds_shard(path: Path, samples: list[dict], mode: str = "w") -> Path:
    """A WebDataset shard: for each sample ({"key", "audio", "ext", "json" dict or None}) its
    ``<key>.<ext>`` and, unless json is None, ``<key>.json``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode) as tf:
        for s in samples:
            add_member(tf, f"{s['key']}.{s.get('ext', 'flac')}", s["audio"])
            if s.get("json") is not None:
                add_member(tf, f"{s['key']}.json", json.dumps(s["json"]).encode())
    return path


def tone_rows(ids: list[str], fmt: str = "flac", seconds: float = 1.5) -> list[dict]:
    return [
        {"id": cid, "audio": encoded(fmt, seconds, clip_freq(i)), "labels": [f"/m/{i % 3}"]}
        for i, cid in enumerate(ids)
    ]
