"""Log-mel features: 16 kHz audio → 10 s windows → dB log-mel → Parquet shards, per chunk.

The front end is the model's own, :class:`dasheng_model.frontend.LogMel` (Dasheng's: torchaudio
``MelSpectrogram``, n_fft 512, hop 160, 64 mels, 0-8 kHz, centred, power 2, then dB clamped at
120 dB below the maximum of EACH window — never of the batch, so a window's features do not depend
on its batch mates). There is no second copy of its parameters: shards record ``MEL_PARAMS``.

A clip is cut into consecutive windows of ``window_s`` (10 s = 160 000 samples → 1001 frames).
Each window is computed on its own samples, exactly as the model's front end sees a 10 s input.
A shorter clip or a clip's tail gives a partial window: its frames are computed on the real
samples only, then padded to 1001 frames with the window's minimum value; ``valid_frames`` is
``samples // hop + 1``. A tail shorter than ``min_tail_s`` is dropped (a clip's first window
is always kept).

``python -m dasheng_pipeline.features.mel`` turns one chunk manifest into a folder of shards (parts of at most
``shards.max_rows`` windows, in clip order) plus a shard manifest that lists them and accounts for
every clip of the chunk (ok, failed or rejected, and at which stage).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import errno
import json
import sys
from dataclasses import dataclass

import numpy as np
import torch

from dasheng_model.frontend import HOP_LENGTH, MEL_PARAMS, N_MELS, SAMPLE_RATE, LogMel
from dasheng_pipeline.common import audio, logs, manifest, provenance
from dasheng_pipeline.features import shards


@dataclass(frozen=True)
class Windowing:
    """How clips are cut into model inputs (config section ``mel``): windows of ``window_s``
    (10 s = 160 000 samples → 1001 frames); a clip's last partial window is kept when it is at
    least ``min_tail_s`` long (a clip's first window always is)."""

    window_s: float
    min_tail_s: float

    @classmethod
    def from_config(cls, mel_cfg: dict) -> Windowing:
        return cls(window_s=float(mel_cfg["window_s"]), min_tail_s=float(mel_cfg["min_tail_s"]))

    @property
    def window_samples(self) -> int:
        return int(round(self.window_s * SAMPLE_RATE))

    @property
    def window_frames(self) -> int:
        return self.window_samples // HOP_LENGTH + 1

    def shard_params(self) -> dict:
        """The mel parameters a shard records: the model's front end plus the window length."""
        return {**MEL_PARAMS, "window_s": self.window_s}


def split_windows(samples: np.ndarray, windowing: Windowing) -> list[tuple[int, np.ndarray]]:
    """Consecutive windows of a clip as (start sample, samples); a short tail is dropped."""
    size = windowing.window_samples
    min_tail = int(round(windowing.min_tail_s * SAMPLE_RATE))
    out = []
    for start in range(0, samples.size, size):
        piece = samples[start : start + size]
        if start > 0 and piece.size < size and piece.size < min_tail:
            break
        out.append((start, piece))
    return out


@torch.no_grad()
def compute(
    logmel: LogMel, pieces: list[np.ndarray], windowing: Windowing
) -> list[tuple[np.ndarray, int]]:
    """Log-mel of windows as ((64, window_frames) float32, valid frames): full windows in
    one batch, partial ones one by one (so padding never touches their real frames)."""
    out: list[tuple[np.ndarray, int] | None] = [None] * len(pieces)
    full = [i for i, p in enumerate(pieces) if p.size == windowing.window_samples]
    if full:
        batch = torch.from_numpy(np.stack([pieces[i] for i in full]))
        mels = np.ascontiguousarray(logmel(batch).numpy())  # torchaudio returns a transposed view
        for j, i in enumerate(full):
            out[i] = (mels[j], windowing.window_frames)
    for i, piece in enumerate(pieces):
        if out[i] is not None:
            continue
        mel = np.ascontiguousarray(logmel(torch.from_numpy(piece)[None])[0].numpy())
        valid = mel.shape[1]
        padded = np.full((N_MELS, windowing.window_frames), mel.min(), dtype=np.float32)
        padded[:, :valid] = mel
        out[i] = (padded, valid)
    return out


class ShardBuilder:
    """Accumulates a chunk's windows, computes log-mel in batches and writes the shard."""

    def __init__(
        self, writer: shards.PartWriter, windowing: Windowing, source: str, batch_size: int
    ):
        self.writer, self.windowing, self.source, self.batch_size = (
            writer,
            windowing,
            source,
            batch_size,
        )
        self.logmel = LogMel().eval()
        self.pending: list[tuple[str, int, float, list[str], np.ndarray]] = []
        self.stats = {"frames": 0, "sum": np.zeros(N_MELS), "sumsq": np.zeros(N_MELS)}

    def add_clip(
        self, clip_id: str, labels: list[str], windows: list[tuple[int, np.ndarray]]
    ) -> None:
        for index, (start, piece) in enumerate(windows):
            self.pending.append((clip_id, index, start / SAMPLE_RATE, labels, piece))
        # Count every pending window, full or partial: counting only full ones let a chunk of
        # short clips (no full window) pile up in memory until the end of the chunk.
        if len(self.pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        results = compute(self.logmel, [p[4] for p in self.pending], self.windowing)
        for (clip_id, index, start_s, labels, _), (mel, valid) in zip(self.pending, results):
            half = mel.astype(np.float16)
            real = half[:, :valid].astype(np.float64)
            self.stats["frames"] += valid
            self.stats["sum"] += real.sum(axis=1)
            self.stats["sumsq"] += (real**2).sum(axis=1)
            self.writer.add(clip_id, self.source, index, start_s, valid, labels, half)
        self.pending = []

    def stats_json(self) -> dict:
        return {
            "frames": int(self.stats["frames"]),
            "sum": [float(v) for v in self.stats["sum"]],
            "sumsq": [float(v) for v in self.stats["sumsq"]],
        }


def _read_clip(
    row: dict, rules: audio.ClipRules, windowing: Windowing
) -> tuple[list[np.ndarray], str, str]:
    """Decode one clip into window-sized blocks (runs in a prefetch thread)."""
    reader = audio.ClipReader(
        row["audio"],
        rules,
        windowing.window_samples,
        start_s=row.get("audio_offset_s") or None,
        duration_s=row.get("audio_duration_s"),
    )
    blocks = list(reader)
    return blocks, reader.reason, reader.note


def read_fetch(manifest_path: str, keys: str | None = None) -> dict:
    """A chunk manifest; with a mirror source's key table, a key obtained in an earlier chunk is
    rejected here (the key table is known only once every chunk of the source is fetched)."""
    fetch = manifest.read(manifest_path)
    if keys:
        from dasheng_pipeline.sources import routes

        fetch["clips"] = routes.resolve_clips(fetch, keys)
    return fetch


def run_chunk(
    manifest_path: str,
    shard_dir: str,
    out: str,
    params: dict,
    threads: int = 1,
    keys: str | None = None,
) -> dict:
    torch.set_num_threads(max(1, threads))
    fetch = read_fetch(manifest_path, keys)
    windowing = Windowing.from_config(params["mel"])
    rules = audio.ClipRules.from_config(params["audio"])
    stamp = provenance.stamp(params, params.get("seed"), audio.versions())
    writer = _part_writer(shard_dir, windowing, params["shards"], stamp)
    builder = ShardBuilder(writer, windowing, fetch["source"], int(params["mel"]["batch_size"]))
    try:
        decoded = _decoded(fetch, rules, windowing, int(params["audio"]["decode_threads"]))
        clips = [_add_clip(builder, windowing, row, blocks) for row, blocks in decoded]
        builder.flush()
        parts = writer.close()
    except BaseException:
        writer.abort()
        raise
    rows = sum(part["rows"] for part in parts)
    doc = manifest.write(
        out,
        stage="mel",
        source=fetch["source"],
        chunk=fetch["chunk"],
        clips=clips,
        provenance=stamp,
        shards=parts,
        rows=rows,
        mel=windowing.shard_params(),
        stats=builder.stats_json(),
    )
    manifest.print_summary(
        f"mel {fetch['source']} chunk {fetch['chunk']} ({rows} windows in {len(parts)} shard(s))",
        clips,
    )
    return doc


def _part_writer(
    shard_dir: str, windowing: Windowing, shard_params: dict, stamp: dict
) -> shards.PartWriter:
    meta = {
        "format_version": shards.FORMAT_VERSION,
        "mel": windowing.shard_params(),
        "provenance": stamp,
    }
    return shards.PartWriter(
        shard_dir,
        N_MELS,
        windowing.window_frames,
        meta,
        int(shard_params["row_group_size"]),
        shard_params["compression"],
        int(shard_params["max_rows"]),
    )


def _decoded(fetch: dict, rules: audio.ClipRules, windowing: Windowing, decode_threads: int):
    """Each row of the chunk with its decoding ``(blocks, reason, note)``, or None for a row the
    fetch did not obtain. Decoding (ffmpeg processes) runs ahead of the mel computation, a bounded
    distance."""
    from tqdm import tqdm

    ok_rows = [c for c in fetch["clips"] if c["status"] == "ok"]
    ahead, futures, ok_index = 2 * decode_threads, {}, 0
    with (
        cf.ThreadPoolExecutor(max_workers=decode_threads) as pool,
        tqdm(
            total=len(fetch["clips"]),
            desc=f"mel {fetch['source']} chunk {fetch['chunk']}",
            unit="clip",
            file=sys.stdout,
            mininterval=5,
        ) as progress,
    ):
        for row in fetch["clips"]:
            while len(futures) < ahead and ok_index < len(ok_rows):
                nxt = ok_rows[ok_index]
                futures[id(nxt)] = pool.submit(_read_clip, nxt, rules, windowing)
                ok_index += 1
            progress.update(1)
            yield row, (futures.pop(id(row)).result() if row["status"] == "ok" else None)


def _add_clip(builder: ShardBuilder, windowing: Windowing, row: dict, decoded) -> dict:
    """One clip's windows into the shards; its line of the manifest."""
    if decoded is None:
        return {**_account(row), "stage": "fetch"}
    blocks, reason, note = decoded
    if reason:
        return manifest.clip(row["clip_id"], "rejected", reason, stage="mel")
    samples = np.concatenate(blocks)
    windows = split_windows(samples, windowing)
    builder.add_clip(row["clip_id"], row.get("labels") or [], windows)
    return manifest.clip(
        row["clip_id"],
        "ok",
        stage="mel",
        windows=len(windows),
        duration_s=round(samples.size / SAMPLE_RATE, 6),
        **({"note": note} if note else {}),
    )


def _account(row: dict) -> dict:
    return {"clip_id": row["clip_id"], "status": row["status"], "reason": row["reason"]}


_STORAGE_ERRORS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file size limit exceeded",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dasheng_pipeline.features.mel", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--manifest", required=True, help="chunk manifest from the fetch/ingest step"
    )
    parser.add_argument("--shards", required=True, help="folder for the chunk's Parquet shards")
    parser.add_argument("--out", required=True, help="shard manifest (JSON) to write")
    parser.add_argument("--params", required=True, help="JSON: mel, audio, shards, seed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keys", help="a mirror source's key table (later copies are rejected)")
    args = parser.parse_args(argv)
    logs.setup()
    try:
        run_chunk(
            args.manifest, args.shards, args.out, json.loads(args.params), args.threads, args.keys
        )
    except OSError as exc:
        why = _STORAGE_ERRORS.get(exc.errno)
        if why is None:
            raise
        # The writers removed their temporary files: nothing is left under a final name.
        raise SystemExit(
            f"error: {why} while writing the shards of {args.manifest} to {args.shards} "
            f"and {args.out} ({exc}); no partial shard was kept: free space and rerun"
        ) from None


if __name__ == "__main__":
    main()
