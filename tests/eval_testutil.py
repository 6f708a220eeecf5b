"""Helpers of the evaluation tests (tests/evaluation/ and its sub-folders import it by name: tests/ is on sys.path)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dasheng_pipeline.evaluation.tasks.demo import wav_bytes

SR = 16000


def write_task(
    root: Path,
    clips: dict[str, dict[str, list]],
    vocabulary: list[str],
    *,
    embedding_type: str = "scene",
    prediction_type: str = "multiclass",
    split_mode: str = "trainvaltest",
    evaluation=("top1_acc",),
    rate: int = SR,
    audio: dict[str, np.ndarray] | None = None,
    name: str = "toy",
    seconds: float = 0.5,
) -> Path:
    """A HEAR task folder: ``clips[split][file] = labels or events``; audio from ``audio[file]``
    (default: a quiet 440 Hz tone of ``seconds``) written as 16-bit wav at ``rate``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    splits = list(clips)
    meta = {
        "task_name": name,
        "version": "t",
        "mode": "full",
        "embedding_type": embedding_type,
        "prediction_type": prediction_type,
        "split_mode": split_mode,
        "sample_duration": seconds,
        "evaluation": list(evaluation),
        "splits": splits,
    }
    if split_mode != "trainvaltest":
        meta["nfolds"] = len(splits)
    (root / "task_metadata.json").write_text(json.dumps(meta))
    (root / "labelvocabulary.csv").write_text(
        "idx,label\n" + "".join(f"{i},{v}\n" for i, v in enumerate(vocabulary))
    )
    for split, files in clips.items():
        (root / f"{split}.json").write_text(json.dumps(files))
        folder = root / str(rate) / split
        folder.mkdir(parents=True, exist_ok=True)
        for fname in files:
            x = (
                audio[fname]
                if audio and fname in audio
                else 0.3 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * SR)) / SR)
            )
            (folder / fname).write_bytes(wav_bytes(x) if rate == SR else _wav_at(x, rate))
    return root


def _wav_at(x: np.ndarray, rate: int) -> bytes:
    import io
    import wave

    n = int(len(x) * rate / SR)
    y = np.interp(np.arange(n) * SR / rate, np.arange(len(x)), x)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(y, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def separable_task(root: Path, per_class: int = 12, seconds: float = 0.5, seed: int = 0) -> Path:
    """Three classes that differ in spectrum (a low tone, a high tone, white noise), random levels
    and frequencies within each class: linearly separable in the mean log-mel."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    labels = ("low", "high", "noise")
    audio, clips = {}, {"train": {}, "valid": {}, "test": {}}
    pattern = ["train"] * 6 + ["valid"] * 2 + ["test"] * 4
    for i in range(per_class):
        for label in labels:
            if label == "low":
                x = np.sin(2 * np.pi * rng.uniform(150, 400) * t)
            elif label == "high":
                x = np.sin(2 * np.pi * rng.uniform(2500, 5000) * t)
            else:
                x = rng.standard_normal(n) / 3
            x = x * 10 ** (-rng.uniform(1, 20) / 20) + rng.standard_normal(n) * 1e-4
            fname = f"{label}-{i:03d}.wav"
            audio[fname] = x
            clips[pattern[i % len(pattern)]][fname] = [label]
    return write_task(root, clips, list(labels), audio=audio, name="separable", seconds=seconds)
