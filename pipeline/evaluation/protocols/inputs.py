"""What every protocol reads: a task's embeddings and labels, split by split (the one split loader),
and the command line of the scoring jobs.

:func:`load_splits` joins one or more splits of a task's embeddings (written by
``python -m dasheng_pipeline.evaluation.embeddings``) with the task's labels:

- scene tasks: one row per clip (its clip embedding) and a multi-hot target row;
- event tasks: one row per 25 Hz frame, the clips' frame ranges (``offsets``), the frames'
  timestamps, the reference events, and frame targets from the protocol's own rule
  (``frame_targets``: HEAR's probe marks a frame inside [start, end]; X-ARES marks
  ceil(onset / hop) <= k < ceil(offset / hop)).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dasheng_pipeline.common import logs
from dasheng_pipeline.evaluation.embeddings import load_split
from dasheng_pipeline.evaluation.tasks.hear import Event, Task

# events of one clip, its frames' timestamps (ms), the split's hop (ms), label → index, labels
FrameTargets = Callable[[list[Event], np.ndarray, float, dict[str, int], int], np.ndarray]


@dataclass
class SplitData:
    """Inputs and targets of one or more task splits joined together."""

    x: np.ndarray  # (n, D) float32: clips (scene) or frames (event)
    y: np.ndarray  # (n, C) float32 multi-hot
    files: list[str]  # "<split>/<file>" of each clip
    offsets: np.ndarray | None = (
        None  # event tasks: (n_files + 1,), clip i is rows offsets[i]:offsets[i+1]
    )
    timestamps: np.ndarray | None = None  # event tasks: (n,) ms
    events: list[dict] | None = (
        None  # event tasks: reference events {file, label, onset, offset} (s)
    )

    @property
    def clips(self) -> int:
        return len(self.files)


def _split_hop(timestamps: np.ndarray) -> float:
    """A split's frame hop (ms): the median step of its first 50 timestamps (40 ms without two)."""
    if len(timestamps) <= 1:
        return 40.0
    return float(np.median(np.diff(timestamps[: min(len(timestamps), 50)])))


def _scene_rows(task: Task, arr: dict, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    index, labels = task.label_index, task.split_labels(split)
    names = [str(f) for f in arr["files"]]
    y = np.zeros((len(names), len(task.vocabulary)), np.float32)
    for i, name in enumerate(names):
        for lab in labels[name]:
            y[i, index[lab]] = 1.0
    return arr["clip"], y, [f"{split}/{n}" for n in names]


def _event_rows(task: Task, arr: dict, split: str, frame_targets, out: dict) -> None:
    """Append one split's frames, targets, timestamps, clip offsets and events to ``out``."""
    index, labels, C = task.label_index, task.split_labels(split), len(task.vocabulary)
    hop = _split_hop(arr["timestamps"])
    for i, name in enumerate(str(f) for f in arr["files"]):
        a, b = int(arr["offsets"][i]), int(arr["offsets"][i + 1])
        ts = arr["timestamps"][a:b]
        out["x"].append(arr["frames"][a:b])
        out["y"].append(frame_targets(labels[name], ts, hop, index, C))
        out["timestamps"].append(ts)
        out["offsets"].append(out["offsets"][-1] + (b - a))
        out["files"].append(f"{split}/{name}")
        out["events"] += [
            {
                "file": f"{split}/{name}",
                "label": ev.label,
                "onset": ev.start_ms / 1000,
                "offset": ev.end_ms / 1000,
            }
            for ev in labels[name]
        ]


def load_splits(
    task: Task, emb_dir: Path, splits: tuple[str, ...], frame_targets: FrameTargets | None
) -> SplitData:
    """The embeddings and targets of ``splits`` of ``task``, joined in order (``frame_targets``:
    the protocol's frame labels, for event tasks)."""
    out: dict[str, list] = {
        "x": [],
        "y": [],
        "files": [],
        "offsets": [0],
        "timestamps": [],
        "events": [],
    }
    for split in splits:
        arr = load_split(emb_dir, split)
        if not task.is_event:
            x, y, files = _scene_rows(task, arr, split)
            out["x"].append(x)
            out["y"].append(y)
            out["files"] += files
        elif "frames" not in arr:
            raise ValueError(
                f"{emb_dir}/{split}.npz has no frame embeddings; an event task needs them"
            )
        else:
            _event_rows(task, arr, split, frame_targets, out)
    x = np.concatenate(out["x"]).astype(np.float32)
    y = np.concatenate(out["y"])
    if not task.is_event:
        return SplitData(x, y, out["files"])
    offsets = np.array(out["offsets"], np.int64)
    return SplitData(x, y, out["files"], offsets, np.concatenate(out["timestamps"]), out["events"])


def result_fields(method: str, meta: dict, task: Task, task_dir: str | Path) -> dict:
    """The fields every protocol's result starts with: method, model, task and its kind."""
    return {
        "method": method,
        "model": meta["model"],
        "task": task.name,
        "task_dir": str(task_dir),
        "task_mode": task.metadata.get("mode"),
        "domain": task.metadata.get("domain"),
        "embedding_type": task.embedding_type,
        "split_mode": task.split_mode,
    }


def scoring_parser(
    module: str, doc: str, params_help: str, threads: bool = True
) -> argparse.ArgumentParser:
    """The command line shared by the jobs that score a task's embeddings (HEAR's probe, k-NN,
    the X-ARES protocols): ``--task``, ``--embeddings``, ``--params`` (JSON), ``--out`` (result
    JSON), ``--threads``."""
    parser = logs.entry_parser(module, doc)
    parser.add_argument(
        "--task", required=True, help="task folder (HEAR format; X-ARES tasks after tasks.xares)"
    )
    parser.add_argument(
        "--embeddings",
        required=True,
        help="folder written by python -m dasheng_pipeline.evaluation.embeddings",
    )
    parser.add_argument("--params", required=True, help=f"JSON: {params_help}")
    parser.add_argument("--out", required=True, help="result JSON")
    if threads:
        parser.add_argument("--threads", type=int, default=1)
    return parser
