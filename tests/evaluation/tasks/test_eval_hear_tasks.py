"""The HEAR task reader: the real fixture, split rotation, bad input."""

import json
import shutil

import numpy as np
import pytest
from eval_testutil import write_task

from dasheng_pipeline.evaluation.tasks import hear as hear_tasks
from dasheng_pipeline.evaluation.tasks.hear import TaskError, folds_for, load_task


def test_reader_on_the_real_spoken_digit_fixture(hear_task):
    task = load_task(hear_task)
    assert task.name == "spoken_digit"
    assert task.embedding_type == "scene" and task.prediction_type == "multiclass"
    assert task.split_mode == "new_split_kfold" and task.metadata["nfolds"] == 5
    assert task.splits == [f"fold{i:02d}" for i in range(5)]
    assert task.sample_rate == 44100 and task.audio_root == hear_task / "44100"
    assert task.vocabulary == [str(i) for i in range(10)]
    assert task.primary_metric == "top1_acc"
    # integer labels in the split JSONs become the vocabulary's strings
    labels = task.split_labels("fold00")
    assert labels["tfds_id_spoken-digit-train-tfrecord-00000-of-00001-102.wav"] == ["8"]
    total = 0
    for split in task.splits:
        clips, rejects = task.clips(split)
        assert rejects == [] and len(clips) == 20
        assert [c.file for c in clips] == sorted(c.file for c in clips)
        assert all(c.labels[0] in task.vocabulary for c in clips)
        total += len(clips)
    assert total == 100
    # 44.1 kHz, 1.0 s → 16 kHz through the project's ffmpeg path
    clip = task.clips("fold03")[0][0]
    samples = hear_tasks.load_audio(clip)
    assert samples.dtype == np.float32 and samples.shape == (16000,)
    assert 0 < np.abs(samples).max() <= 1.0
    # the k-fold rotation
    folds = task.folds()
    assert len(folds) == 5
    assert (folds[4].test, folds[4].valid, folds[4].train) == (
        ("fold04",),
        ("fold00",),
        ("fold01", "fold02", "fold03"),
    )


def test_kfold_rotation_is_test_i_valid_i_plus_1_train_the_rest():
    splits = [f"fold{i:02d}" for i in range(5)]
    folds = folds_for("presplit_kfold", splits)
    for i, fold in enumerate(folds):
        assert fold.index == i
        assert fold.test == (splits[i],)
        assert fold.valid == (splits[(i + 1) % 5],)
        assert fold.train == tuple(s for j, s in enumerate(splits) if j not in (i, (i + 1) % 5))
    assert folds_for("new_split_kfold", splits) == folds
    # every split is a test split exactly once and a valid split exactly once
    assert (
        sorted(f.test[0] for f in folds) == splits and sorted(f.valid[0] for f in folds) == splits
    )
    three = folds_for("new_split_kfold", ["a", "b", "c"])
    assert [(f.train, f.valid, f.test) for f in three] == [
        (("c",), ("b",), ("a",)),
        (("a",), ("c",), ("b",)),
        (("b",), ("a",), ("c",)),
    ]
    assert folds_for("trainvaltest", ["train", "valid", "test"])[0].train == ("train",)


def test_event_task_with_string_labels_and_ms_times(tmp_path):
    root = write_task(
        tmp_path / "ev",
        {
            "train": {"a.wav": [{"label": "dog", "start": 100, "end": 350.5}], "b.wav": []},
            "valid": {"c.wav": [{"label": "cat", "start": 0, "end": 20}]},
            "test": {
                "d.wav": [
                    {"label": "dog", "start": 10.0, "end": 90},
                    {"label": "cat", "start": 5, "end": 6},
                ]
            },
        },
        ["dog", "cat"],
        embedding_type="event",
        prediction_type="multilabel",
        evaluation=("event_onset_200ms_fms",),
    )
    task = load_task(root)
    assert task.is_event
    clips, rejects = task.clips("test")
    assert rejects == []
    assert clips[0].events == (
        hear_tasks.Event("dog", 10.0, 90.0),
        hear_tasks.Event("cat", 5.0, 6.0),
    )
    assert task.clips("train")[0][1].events == ()


def _good(tmp_path, **kw):
    return write_task(
        tmp_path / "bad",
        {"train": {"a.wav": ["x"]}, "valid": {"b.wav": ["y"]}, "test": {"c.wav": [1]}},
        ["x", "y", "1"],
        **kw,
    )


def _edit_meta(root, **changes):
    meta = json.loads((root / "task_metadata.json").read_text())
    for k, v in changes.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    (root / "task_metadata.json").write_text(json.dumps(meta))


def test_numeric_labels_match_the_vocabulary(tmp_path):
    task = load_task(_good(tmp_path))
    assert task.split_labels("test") == {"c.wav": ["1"]}
    assert hear_tasks.normalise_label(8.0) == "8" and hear_tasks.normalise_label(2.5) == "2.5"
    assert hear_tasks.normalise_label(True) is None


@pytest.mark.parametrize(
    "break_it, message",
    [
        (
            lambda r: (r / "task_metadata.json").unlink(),
            r"task 'bad', file '.*task_metadata.json': missing",
        ),
        (
            lambda r: (r / "task_metadata.json").write_text("{not json"),
            r"task_metadata.json': not valid JSON",
        ),
        (
            lambda r: _edit_meta(r, embedding_type=None),
            r"task 'toy', file '.*task_metadata.json', field 'embedding_type': missing",
        ),
        (lambda r: _edit_meta(r, split_mode="folds"), r"field 'split_mode': 'folds' is not one of"),
        (
            lambda r: _edit_meta(r, evaluation=["accuracy"]),
            r"field 'evaluation': unknown metrics \['accuracy'\]",
        ),
        (
            lambda r: _edit_meta(r, splits=["train", "test"]),
            r"field 'splits': split_mode 'trainvaltest' needs",
        ),
        (lambda r: _edit_meta(r, sample_duration="5 s"), r"field 'sample_duration'"),
        (
            lambda r: (r / "labelvocabulary.csv").write_text("id,name\n0,x\n"),
            r"labelvocabulary.csv': expected a header",
        ),
        (
            lambda r: (r / "16000").rename(r / "8000"),
            r"file '.*8000': unsupported sample rate \[8000\] Hz",
        ),
        (lambda r: shutil.rmtree(r / "16000"), r"no audio folder"),
    ],
)
def test_bad_metadata_is_a_clear_error(tmp_path, break_it, message):
    root = _good(tmp_path)
    break_it(root)
    with pytest.raises(TaskError, match=message):
        load_task(root)


@pytest.mark.parametrize(
    "content, message",
    [
        (
            {"a.wav": ["z"]},
            r"task 'toy', file '.*train.json', field 'a.wav': label 'z' is not in labelvocabulary.csv",
        ),
        ({"a.wav": [7]}, r"field 'a.wav': label 7 is not in labelvocabulary.csv"),
        ({}, r"file '.*train.json': empty split"),
        ({"a.wav": ["x", "y"]}, r"field 'a.wav': a multiclass task needs exactly one label"),
        ({"../a.wav": ["x"]}, r"bad file name"),
        ([1, 2], r"expected an object"),
    ],
)
def test_bad_split_files_are_clear_errors(tmp_path, content, message):
    root = _good(tmp_path)
    (root / "train.json").write_text(json.dumps(content))
    task = load_task(root)
    with pytest.raises(TaskError, match=message):
        task.split_labels("train")


def test_bad_events_name_the_event(tmp_path):
    root = write_task(
        tmp_path / "ev",
        {
            "train": {"a.wav": [{"label": "dog", "start": 300, "end": 100}]},
            "valid": {"b.wav": []},
            "test": {"c.wav": [{"label": "dog", "start": 1}]},
        },
        ["dog"],
        embedding_type="event",
        prediction_type="multilabel",
        evaluation=("event_onset_200ms_fms",),
    )
    task = load_task(root)
    with pytest.raises(
        TaskError, match=r"field 'a.wav\[0\]': end 100.0 ms is before start 300.0 ms"
    ):
        task.split_labels("train")
    with pytest.raises(TaskError, match=r"field 'c.wav\[0\].end': missing"):
        task.split_labels("test")


def test_missing_split_file_and_missing_wav(tmp_path):
    root = _good(tmp_path)
    (root / "16000" / "train" / "a.wav").unlink()
    task = load_task(root)
    clips, rejects = task.clips("train")
    assert clips == [] and len(rejects) == 1
    assert rejects[0].file == "a.wav" and "missing wav file" in rejects[0].reason
    (root / "valid.json").unlink()
    with pytest.raises(TaskError, match=r"file '.*valid.json': split file missing"):
        task.split_labels("valid")
