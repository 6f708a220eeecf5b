"""Training batches from log-mel Parquet shards.

The unit of work is a *part*: one row group of one shard (256 windows). For epoch ``e``:

* every pass over the data visits all parts in an order drawn from ``rng([seed, e, pass])`` (the
  same order on every rank), and *stream* ``s`` of ``S = world_size × loader_workers`` streams
  reads the parts at positions ``s, s + S, s + 2S, ...`` of it — each part goes to exactly one
  stream per pass;
* each stream mixes its rows through a shuffle buffer seeded by ``rng([seed, e, rank, worker])``
  and yields whole batches until it has produced its share of the epoch's batches (an epoch is a
  fixed number of batches, so passes repeat as needed).

So an epoch's batches depend only on (seed, epoch, world size, loader workers): a run resumed at
an epoch boundary sees exactly the batches the uninterrupted run saw. ``torch.utils.data.DataLoader``
interleaves its workers' batches in a fixed order, which keeps that true with several workers.

**Resuming inside an epoch** (``skip``: batches of this rank's epoch already consumed, from a step
checkpoint): a stream's state after any number of batches is a function of that seed schedule alone,
so it is recreated, not stored: the stream replays its first batches on row *pointers* (part, row)
instead of rows — the shuffle buffer's draws depend only on its length — which reads no data; then
it loads just the rows its buffer holds at that point and goes on exactly as the uninterrupted run
did. The loader workers' roles rotate so that the DataLoader's round robin, which restarts at worker
0, continues with the batch that comes next.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from dasheng_pipeline.features import shards


@dataclass(frozen=True)
class Part:
    path: str
    row_group: int
    rows: int


def parts_of(paths: list[str]) -> list[Part]:
    """Every non-empty row group of the given shards, in order."""
    out = []
    for path in paths:
        meta = pq.ParquetFile(path).metadata
        for i in range(meta.num_row_groups):
            rows = meta.row_group(i).num_rows
            if rows:
                out.append(Part(str(path), i, rows))
    return out


def read_part(part: Part) -> tuple[np.ndarray, np.ndarray]:
    """(mel float16 (R, 64, T), valid_frames int64 (R,)) of one row group."""
    [batch] = list(
        shards.iter_batches(
            part.path,
            batch_size=part.rows,
            columns=("mel", "valid_frames"),
            row_groups=[part.row_group],
        )
    )
    return batch["mel"], batch["valid_frames"].astype(np.int64)


def split_count(total: int, n: int, i: int) -> int:
    """Share ``i`` of ``total`` items split as evenly as possible into ``n`` shares."""
    return total // n + (1 if i < total % n else 0)


class TrainBatches(IterableDataset):
    """One rank's batches of one epoch: dicts {"mel": float16 (B, 64, T), "valid_frames": (B,)}.

    ``skip``: the first ``skip`` batches of this rank's epoch are not produced (resume inside an
    epoch); the rest are exactly those the full epoch would give after them."""

    def __init__(
        self,
        parts: list[Part],
        batch_size: int,
        batches: int,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1024,
        skip: int = 0,
    ):
        if not parts:
            raise ValueError("no training data: the shard list is empty")
        if not 0 <= skip <= batches:
            raise ValueError(f"skip={skip} is outside the epoch's {batches} batches")
        self.parts, self.batch_size, self.batches = parts, batch_size, batches
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.shuffle_buffer = max(shuffle_buffer, batch_size)
        self.skip = skip

    def _parts_of_stream(self, stream: int, streams: int) -> Iterator[Part]:
        n = len(self.parts)
        for pass_no in range(1 << 30):
            order = np.random.default_rng([self.seed, self.epoch, pass_no]).permutation(n)
            if n >= streams:
                mine = order[stream::streams]
            else:  # fewer parts than streams: every stream reads one part per pass, cyclically
                mine = order[[(stream + pass_no * streams) % n]]
            for i in mine:
                yield self.parts[int(i)]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        slot, workers = (info.id, info.num_workers) if info else (0, 1)
        # Batch i of the epoch comes from worker i % workers; after `skip` batches the DataLoader's
        # round robin restarts at slot 0, which must play the worker of batch `skip`.
        worker = (slot + self.skip) % workers
        stream, streams = self.rank * workers + worker, self.world_size * workers
        todo = split_count(self.batches, workers, worker)
        skip = split_count(
            self.skip, workers, worker
        )  # this worker's batches before the resume point
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        # Buffer items are (mel row, valid frames) — or, while replaying skipped batches, (part no, row).
        buf: list[tuple] = []
        out: list[tuple] = []
        done = 0
        parts: list[Part] = []
        source = self._parts_of_stream(stream, streams)
        k = 0  # number of the part being read (parts[k])
        while done < todo:
            parts.append(next(source))
            replay = done < skip
            mel, valid = (None, None) if replay else read_part(parts[k])
            for row in range(parts[k].rows):
                item = (k, row) if replay else (mel[row], int(valid[row]))
                if len(buf) < self.shuffle_buffer:
                    buf.append(item)
                    continue
                j = int(rng.integers(len(buf)))
                out.append(buf[j])
                buf[j] = item
                if len(out) < self.batch_size:
                    continue
                done += 1
                if not replay:
                    yield collate([m for m, _ in out], [v for _, v in out])
                out = []
                if done == todo:
                    return
                if (
                    replay and done == skip
                ):  # the resume point: load what the buffer holds, go on with rows
                    buf = _load_pointers(buf, parts)
                    replay = False
                    mel, valid = read_part(parts[k])
            k += 1


def _load_pointers(buf: list[tuple], parts: list[Part]) -> list[tuple]:
    """Replace (part no, row) pointers by the rows they point at (each part read once)."""
    loaded = {}
    for k in sorted({k for k, _ in buf}):
        loaded[k] = read_part(parts[k])
    return [(loaded[k][0][row], int(loaded[k][1][row])) for k, row in buf]


def collate(mels: list[np.ndarray], valid: list[int]) -> dict:
    return {
        "mel": torch.from_numpy(np.stack(mels)),
        "valid_frames": torch.tensor(valid, dtype=torch.long),
    }


class ValidationBatches:
    """A fixed, unshuffled set of validation batches: one rank's share of the first
    ``max_rows`` rows of the validation parts (every rank sees the same set every epoch)."""

    def __init__(
        self, parts: list[Part], batch_size: int, max_rows: int, rank: int = 0, world_size: int = 1
    ):
        self.parts, self.batch_size, self.max_rows = parts, batch_size, max_rows
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[dict]:
        seen = 0
        mels, valid = [], []
        for part in self.parts:
            mel, frames = read_part(part)
            for row in range(mel.shape[0]):
                if seen >= self.max_rows:
                    break
                if seen % self.world_size == self.rank:
                    mels.append(mel[row])
                    valid.append(int(frames[row]))
                    if len(mels) == self.batch_size:
                        yield collate(mels, valid)
                        mels, valid = [], []
                seen += 1
        if mels:
            yield collate(mels, valid)
