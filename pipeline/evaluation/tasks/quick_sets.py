"""The quick set of a HEAR scene task: ``python -m dasheng_pipeline.evaluation.tasks.quick_sets``.

The input of the quick checks (:mod:`dasheng_pipeline.common.quick_checks`: during pre-training,
and the layer-wise table of ``dasheng_pipeline.evaluation.report.layers``): the clips of the
task's first split (train + valid clips → ``train``, test clips → test) with their classes, as
the quick-checks format stores them (dB log-mel from the model's own front end, cut to
``max_seconds``). At most ``max_clips`` clips, drawn with the seed when the task has more (train
and test in their proportion).

Multiclass scene tasks only: an event or multilabel task is an error naming the task. Clips that
do not decode are skipped and listed in the job's log.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from dasheng_pipeline.common import logs, provenance, quick_checks
from dasheng_pipeline.evaluation.tasks import hear

log = logging.getLogger(__name__)


def quick_clips(task: hear.Task, max_clips: int, seed: int) -> list[quick_checks.QuickClip]:
    """The first split's clips (train + valid → train, test → test), at most ``max_clips`` of
    them drawn with ``seed``."""
    if task.is_event or task.prediction_type != "multiclass":
        raise hear.TaskError(
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
    return [
        quick_checks.QuickClip(c.path, index[c.labels[0]], train, f"{c.split}/{c.file}")
        for c, train in clips
    ]


def build(
    task_dir: str | Path, max_clips: int, max_seconds: float, seed: int
) -> dict[str, np.ndarray]:
    """The quick set's arrays of the HEAR task at ``task_dir``."""
    task = hear.load_task(task_dir)
    clips = quick_clips(task, max_clips, seed)
    where = f"task {task.name!r} ({task.root})"
    return quick_checks.quick_set_arrays(task.name, where, clips, task.vocabulary, max_seconds)


def main(argv: list[str] | None = None) -> None:
    parser = logs.entry_parser("dasheng_pipeline.evaluation.tasks.quick_sets", __doc__)
    parser.add_argument("--task", required=True, help="HEAR task folder")
    parser.add_argument("--params", required=True, help="JSON: seed, max_clips, max_seconds")
    parser.add_argument("--out", required=True, help=".npz to write")
    args = parser.parse_args(argv)
    logs.setup()
    params = json.loads(args.params)
    with logs.one_line_errors():
        arrays = build(
            args.task, int(params["max_clips"]), float(params["max_seconds"]), int(params["seed"])
        )
    quick_checks.save_quick_set(args.out, arrays, provenance.stamp(params, params["seed"]))
    log.info(
        f"wrote {args.out}: {len(arrays['label'])} clips ({int(arrays['train'].sum())} train), "
        f"{len(arrays['classes'])} classes"
    )


if __name__ == "__main__":
    main()
