"""Quick sets of HEAR tasks (pipeline/evaluation/tasks/quick_sets.py, in the format of
pipeline/common/quick_checks.py)."""

import json

import numpy as np
import pytest
from eval_testutil import separable_task, write_task

from dasheng_pipeline.common import quick_checks
from dasheng_pipeline.evaluation.tasks import hear, quick_sets


def test_the_entry_point_writes_the_first_split_as_log_mel(tmp_path):
    task = separable_task(tmp_path / "task")
    out = tmp_path / "separable.npz"
    params = {"seed": 0, "max_clips": 512, "max_seconds": 10.0}
    quick_sets.main(["--task", str(task), "--params", json.dumps(params), "--out", str(out)])
    t = quick_checks.load_quick_set(out)
    assert t.name == "separable" and t.classes == ["low", "high", "noise"]
    # separable_task: per class 12 clips, dealt 6 train / 2 valid / 4 test of every 12
    assert t.mel.shape == (36, 64, 51) and t.mel.dtype == np.float16
    assert int(t.train.sum()) == 24 and np.bincount(t.label[~t.train]).tolist() == [4, 4, 4]
    assert t.valid_frames.tolist() == [51] * 36  # 0.5 s: 8000 // 160 + 1
    with np.load(out) as data:
        assert json.loads(str(data["provenance"]))["seed"] == 0
    # max_clips draws with the seed, train and test in their proportion
    few = quick_sets.build(task, max_clips=12, max_seconds=0.25, seed=0)
    assert len(few["label"]) == 12 and few["mel"].shape[2] == 26  # 0.25 s: 4000 // 160 + 1
    assert few["train"].any() and not few["train"].all()


def test_an_event_task_is_refused_by_name(tmp_path):
    task = write_task(
        tmp_path / "ev",
        {"train": {"a.wav": []}, "valid": {"b.wav": []}, "test": {"c.wav": []}},
        ["beep"],
        embedding_type="event",
        prediction_type="multilabel",
        name="evtask",
        evaluation=("event_onset_200ms_fms",),
    )
    with pytest.raises(hear.TaskError, match="'evtask'.*needs a multiclass scene task"):
        quick_sets.build(task, 512, 10.0, 0)
