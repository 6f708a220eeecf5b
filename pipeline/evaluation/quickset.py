"""A quick set of a HEAR scene task: ``python -m dasheng_pipeline.evaluation.quickset``.

The input of the quick downstream checks (``dasheng_pipeline.training.downstream``: during pre-training,
and the layer-wise table of ``dasheng_pipeline.evaluation.layers``): the dB log-mel of every clip of the
task's first split (train + valid clips → ``train``, test clips → test), cut to ``max_seconds``,
computed with the model's own front end, and each clip's class. At most ``max_clips`` clips, drawn
with the seed when the task has more (train and test in their proportion). A plain ``.npz``
(``name``, ``mel`` (n, 64, T) float16 padded with each clip's minimum, ``valid_frames`` (n,),
``label`` (n,), ``train`` (n,) bool, ``classes`` (C,)), read without pickles.

Multiclass scene tasks only: an event or multilabel task is an error naming the task. Clips that
do not decode are skipped and listed in the job's log.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from dasheng_model.frontend import LogMel
from dasheng_model.inputs import SAMPLES_PER_TOKEN
from dasheng_pipeline.common import atomic, audio, logs, provenance
from dasheng_pipeline.evaluation import hear_tasks

log = logging.getLogger(__name__)


def build(
    task_dir: str | Path, max_clips: int = 512, max_seconds: float = 10.0, seed: int = 0
) -> dict[str, np.ndarray]:
    task = hear_tasks.load_task(task_dir)
    if task.is_event or task.prediction_type != "multiclass":
        raise hear_tasks.TaskError(
            f"task {task.name!r} ({task.root}): a quick set needs a multiclass scene task, "
            f"not a {task.prediction_type} {task.embedding_type} task; leave it out of the quick tasks"
        )
    fold = task.folds()[0]
    clips = [(c, True) for s in (*fold.train, *fold.valid) for c in task.clips(s)[0]]
    clips += [(c, False) for s in fold.test for c in task.clips(s)[0]]
    if len(clips) > max_clips:
        keep = np.sort(np.random.default_rng(seed).choice(len(clips), max_clips, replace=False))
        clips = [clips[i] for i in keep]
    index = task.label_index
    logmel = LogMel().eval()
    max_samples = int(max_seconds * audio.SAMPLE_RATE)
    mels, valid, labels, train = [], [], [], []
    from tqdm import tqdm

    for clip, is_train in tqdm(
        clips, desc=f"quick set {task.name}", unit="clip", file=sys.stdout, mininterval=5
    ):
        try:
            x = hear_tasks.load_audio(clip)[:max_samples]
        except audio.DecodeError as exc:
            log.warning(
                f"task {task.name!r}: skipped {clip.split}/{clip.file}: undecodable: {exc.reason}"
            )
            continue
        if x.size == 0 or not np.isfinite(x).all():
            log.warning(
                f"task {task.name!r}: skipped {clip.split}/{clip.file}: empty or not finite"
            )
            continue
        x = np.pad(x, (0, max(0, SAMPLES_PER_TOKEN - x.size)))
        with torch.no_grad():
            mels.append(logmel(torch.from_numpy(x)[None])[0].numpy())  # (64, T)
        valid.append(mels[-1].shape[1])
        labels.append(index[clip.labels[0]])
        train.append(is_train)
    if not any(train) or all(train):
        raise hear_tasks.TaskError(
            f"task {task.name!r} ({task.root}): the quick set needs train and test clips, "
            f"got {sum(train)} train and {len(train) - sum(train)} test"
        )
    T = max(valid)
    mel = np.stack(
        [np.pad(m, ((0, 0), (0, T - m.shape[1])), constant_values=m.min()) for m in mels]
    )
    return {
        "name": np.array(task.name),
        "mel": mel.astype(np.float16),
        "valid_frames": np.array(valid, np.int64),
        "label": np.array(labels, np.int64),
        "train": np.array(train, bool),
        "classes": np.array(task.vocabulary, dtype=str),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dasheng_pipeline.evaluation.quickset", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--task", required=True, help="HEAR task folder")
    parser.add_argument("--params", default="{}", help="JSON: seed, max_clips, max_seconds")
    parser.add_argument("--out", required=True, help=".npz to write")
    args = parser.parse_args(argv)
    logs.setup()
    params = json.loads(args.params)
    with logs.one_line_errors(hear_tasks.TaskError):
        arrays = build(
            args.task,
            int(params.get("max_clips", 512)),
            float(params.get("max_seconds", 10.0)),
            int(params.get("seed", 0)),
        )
    arrays["provenance"] = np.array(
        json.dumps(provenance.stamp(params, params.get("seed")), sort_keys=True)
    )
    with atomic.atomic_path(args.out) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    log.info(
        f"wrote {args.out}: {len(arrays['label'])} clips ({int(arrays['train'].sum())} train), "
        f"{len(arrays['classes'])} classes"
    )


if __name__ == "__main__":
    main()
