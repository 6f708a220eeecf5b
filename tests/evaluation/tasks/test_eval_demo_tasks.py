"""The demo tasks (pipeline/evaluation/tasks/demo.py): deterministic, held out from the demo
pre-training audio, valid HEAR folders."""

import hashlib
import json

import numpy as np
import pytest

from dasheng_pipeline.evaluation.tasks import demo as demo_tasks
from dasheng_pipeline.evaluation.tasks import hear as hear_tasks
from dasheng_pipeline.sources import demo


def _tree_hash(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_demo_tasks_are_deterministic_held_out_hear_folders(tmp_path):
    assert demo.CORPUS_STREAM == 0 and all(s.stream >= 1 for s in demo_tasks.SPECS.values())
    assert len({s.stream for s in demo_tasks.SPECS.values()}) == len(demo_tasks.SPECS)
    for name in ("demo_pitch", "demo_events"):
        demo_tasks.generate(name, tmp_path / f"a/{name}", seed=0, scale=0.3)
        demo_tasks.generate(name, tmp_path / f"b/{name}", seed=0, scale=0.3)
        assert _tree_hash(tmp_path / f"a/{name}") == _tree_hash(tmp_path / f"b/{name}")
    pitch = hear_tasks.load_task(tmp_path / "a/demo_pitch")
    assert pitch.vocabulary == [str(n) for n in range(48, 72)] and pitch.evaluation == [
        "pitch_acc",
        "chroma_acc",
    ]
    raw = json.loads((tmp_path / "a/demo_pitch/train.json").read_text())
    assert all(isinstance(v[0], int) for v in raw.values())  # numeric labels, as NSynth's
    counts = {s: len(pitch.clips(s)[0]) for s in pitch.splits}
    assert counts == {
        "train": 72,
        "valid": 24,
        "test": 24,
    }  # 24 notes × 5 clips (scale 0.3 → the minimum, 5): 3/1/1
    ev = hear_tasks.load_task(tmp_path / "a/demo_events")
    assert ev.is_event and ev.metadata["domain"] == "env"
    for split in ev.splits:
        for clip in ev.clips(split)[0]:
            assert 1 <= len(clip.events) <= 3
            assert all(0 <= e.start_ms < e.end_ms <= 3000 for e in clip.events)
    x = hear_tasks.load_audio(ev.clips("test")[0][0])
    assert x.shape == (48000,) and np.abs(x).max() > 0.05
    # another seed gives other audio
    demo_tasks.generate("demo_pitch", tmp_path / "c/demo_pitch", seed=1, scale=0.3)
    assert _tree_hash(tmp_path / "c/demo_pitch") != _tree_hash(tmp_path / "a/demo_pitch")
    assert demo_tasks.available("false") == list(demo_tasks.SYNTHETIC)


@pytest.mark.skipif(
    demo_tasks.espeak_exe() is None,
    reason="espeak-ng is not installed (the speech demo tasks are optional)",
)
def test_speech_demo_tasks_with_espeak(tmp_path):
    for name in demo_tasks.SPEECH:
        demo_tasks.generate(name, tmp_path / name, seed=0, scale=0.2)
        task = hear_tasks.load_task(tmp_path / name)
        assert task.metadata["domain"] == "speech"
        clip = task.clips(task.splits[0])[0][0]
        x = hear_tasks.load_audio(clip)
        assert (
            x.shape == (int(task.metadata["sample_duration"] * 16000),) and np.abs(x).max() > 0.01
        )
    assert demo_tasks.available("auto") == list(demo_tasks.SYNTHETIC + demo_tasks.SPEECH)
