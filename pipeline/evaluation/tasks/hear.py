"""Read HEAR task folders (the output of hear-preprocess, or the demo tasks of
``dasheng_pipeline.evaluation.tasks.demo``).

A task folder holds ``task_metadata.json``, ``labelvocabulary.csv`` (``idx,label``), one
``<split>.json`` per split (scene: ``{"file.wav": [label, ...]}``; event:
``{"file.wav": [{"label": l, "start": ms, "end": ms}, ...]}``; labels JSON strings or numbers)
and the audio under ``<sample_rate>/<split>/*.wav``. Audio is always read through the project's
one ffmpeg path (:func:`dasheng_pipeline.common.audio.decode`), which resamples it to 16 kHz mono.

Bad input raises :class:`TaskError`, whose message names the task, the file and the field.
A wav file named in a split but missing from disk is not an error: :meth:`Task.clips` reports it
as a reject (the caller writes it next to its outputs and prints it) and goes on.

Splits (HEAR's rotation): ``trainvaltest`` tasks have one split (train / valid / test); k-fold tasks
(``presplit_kfold``, ``new_split_kfold``) have k: for fold i, test = fold i, valid = fold i+1 (mod k),
train = the other folds.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dasheng_pipeline.common import audio
from dasheng_pipeline.evaluation.metrics import EVENT_METRICS, SCENE_METRICS

METADATA = "task_metadata.json"
VOCABULARY = "labelvocabulary.csv"
SUPPORTED_RATES = (48000, 44100, 32000, 22050, 16000)
EMBEDDING_TYPES = ("scene", "event")
PREDICTION_TYPES = ("multiclass", "multilabel")
SPLIT_MODES = ("trainvaltest", "presplit_kfold", "new_split_kfold")
TRAINVALTEST = ("train", "valid", "test")


class TaskError(ValueError):
    """A task folder that does not follow the HEAR format; the message names task, file and field."""


@dataclass(frozen=True)
class Event:
    label: str
    start_ms: float
    end_ms: float


@dataclass(frozen=True)
class Clip:
    split: str
    file: str  # name as in the split JSON
    path: Path
    labels: tuple[str, ...]  # scene tasks (empty for event tasks)
    events: tuple[Event, ...]  # event tasks (empty for scene tasks)


@dataclass(frozen=True)
class Reject:
    split: str
    file: str
    reason: str

    def as_dict(self) -> dict:
        return {"split": self.split, "file": self.file, "reason": self.reason}


@dataclass(frozen=True)
class Fold:
    """One train/valid/test assignment of split names."""

    index: int
    train: tuple[str, ...]
    valid: tuple[str, ...]
    test: tuple[str, ...]


@dataclass
class Task:
    root: Path
    metadata: dict[str, Any]
    vocabulary: list[str]  # labels in idx order
    audio_root: Path  # the <sample_rate> folder used
    sample_rate: int
    _splits: dict[str, dict] = field(default_factory=dict, repr=False)

    # -- metadata views ------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return str(self.metadata["task_name"])

    @property
    def embedding_type(self) -> str:
        return self.metadata["embedding_type"]

    @property
    def is_event(self) -> bool:
        return self.embedding_type == "event"

    @property
    def prediction_type(self) -> str:
        return self.metadata["prediction_type"]

    @property
    def split_mode(self) -> str:
        return self.metadata["split_mode"]

    @property
    def splits(self) -> list[str]:
        return list(self.metadata["splits"])

    @property
    def evaluation(self) -> list[str]:
        return list(self.metadata["evaluation"])

    @property
    def primary_metric(self) -> str:
        return self.evaluation[0]

    @property
    def label_index(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.vocabulary)}

    def where(self, filename: str, fieldname: str | None = None) -> str:
        """``task 'x', file 'y', field 'z'`` for messages."""
        text = f"task {self.name!r}, file {str(self.root / filename)!r}"
        return text + (f", field {fieldname!r}" if fieldname else "")

    # -- splits ---------------------------------------------------------------------------------
    def folds(self) -> list[Fold]:
        return folds_for(self.split_mode, self.splits)

    def split_labels(self, split: str) -> dict[str, list]:
        """The raw (validated) content of ``<split>.json``: file → labels or events."""
        if split not in self._splits:
            self._splits[split] = self._read_split(split)
        return self._splits[split]

    def _read_split(self, split: str) -> dict:
        if split not in self.splits:
            raise TaskError(
                f"{self.where(METADATA, 'splits')}: no split {split!r} (splits: {self.splits})"
            )
        name = f"{split}.json"
        path = self.root / name
        if not path.is_file():
            raise TaskError(
                f"{self.where(name)}: split file missing (listed in {METADATA} 'splits')"
            )
        data = _read_object(path, self.where(name), 'an object {"file.wav": labels}')
        if not data:
            raise TaskError(f"{self.where(name)}: empty split (no files)")
        index = self.label_index
        out: dict[str, list] = {}
        for fname, value in data.items():
            if (
                not isinstance(fname, str)
                or not fname
                or "/" in fname
                or "\\" in fname
                or fname in (".", "..")
            ):
                raise TaskError(
                    f"{self.where(name)}: bad file name {fname!r} (a plain file name is expected)"
                )
            if not isinstance(value, list):
                raise TaskError(
                    f"{self.where(name, fname)}: expected a list of "
                    f"{'events' if self.is_event else 'labels'}, got {type(value).__name__}"
                )
            if self.is_event:
                out[fname] = [self._event(name, fname, i, ev, index) for i, ev in enumerate(value)]
            else:
                labels = [self._label(name, fname, lab, index) for lab in value]
                if not labels:
                    raise TaskError(f"{self.where(name, fname)}: no label")
                if self.prediction_type == "multiclass" and len(labels) != 1:
                    raise TaskError(
                        f"{self.where(name, fname)}: a multiclass task needs exactly one label, "
                        f"got {len(labels)}"
                    )
                out[fname] = labels
        return out

    def _label(self, name: str, fname: str, raw: Any, index: dict[str, int]) -> str:
        label = normalise_label(raw)
        if label is None:
            raise TaskError(
                f"{self.where(name, fname)}: label {raw!r} is neither a string nor a number"
            )
        if label not in index:
            raise TaskError(
                f"{self.where(name, fname)}: label {raw!r} is not in {VOCABULARY} "
                f"({len(self.vocabulary)} labels)"
            )
        return label

    def _event(self, name: str, fname: str, i: int, ev: Any, index: dict[str, int]) -> Event:
        where = f"{fname}[{i}]"
        if not isinstance(ev, dict):
            raise TaskError(
                f"{self.where(name, where)}: expected an event {{label, start, end}}, got {ev!r}"
            )
        for key in ("label", "start", "end"):
            if key not in ev:
                raise TaskError(f"{self.where(name, where + '.' + key)}: missing")
        label = self._label(name, where + ".label", ev["label"], index)
        times = []
        for key in ("start", "end"):
            v = ev[key]
            if (
                isinstance(v, bool)
                or not isinstance(v, (int, float))
                or not math.isfinite(v)
                or v < 0
            ):
                raise TaskError(
                    f"{self.where(name, where + '.' + key)}: expected milliseconds >= 0, got {v!r}"
                )
            times.append(float(v))
        if times[1] < times[0]:
            raise TaskError(
                f"{self.where(name, where)}: end {times[1]} ms is before start {times[0]} ms"
            )
        return Event(label, times[0], times[1])

    def clips(self, split: str) -> tuple[list[Clip], list[Reject]]:
        """Every clip of a split whose wav exists (sorted by file name), and the rejects."""
        labels = self.split_labels(split)
        folder = self.audio_root / split
        clips, rejects = [], []
        for fname in sorted(labels):
            path = folder / fname
            if not path.is_file():
                rejects.append(Reject(split, fname, f"missing wav file {str(path)!r}"))
                continue
            value = labels[fname]
            if self.is_event:
                clips.append(Clip(split, fname, path, (), tuple(value)))
            else:
                clips.append(Clip(split, fname, path, tuple(value), ()))
        return clips, rejects


def normalise_label(raw: Any) -> str | None:
    """A label as the vocabulary spells it: strings unchanged, integral numbers as integers
    (``8``, ``8.0`` → ``"8"``), other numbers as Python prints them."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, str):
        return raw
    if isinstance(raw, int):
        return str(raw)
    if isinstance(raw, float) and math.isfinite(raw):
        return str(int(raw)) if raw.is_integer() else repr(raw)
    return None


def folds_for(split_mode: str, splits: list[str]) -> list[Fold]:
    """HEAR's rotation of splits into (train, valid, test) assignments."""
    if split_mode == "trainvaltest":
        return [Fold(0, ("train",), ("valid",), ("test",))]
    k = len(splits)
    out = []
    for i in range(k):
        test, valid = splits[i], splits[(i + 1) % k]
        train = tuple(s for s in splits if s not in (test, valid))
        out.append(Fold(i, train, (valid,), (test,)))
    return out


def _read_object(path: Path, where: str, expected: str) -> dict:
    """A JSON file that must hold an object; TaskError naming the file otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TaskError(f"{where}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise TaskError(f"{where}: expected {expected}, got {type(data).__name__}")
    return data


def _require(meta: dict, key: str, where, types: type, allowed=None):
    if key not in meta:
        raise TaskError(f"{where(METADATA, key)}: missing")
    value = meta[key]
    if not isinstance(value, types) or (isinstance(value, bool) and types is not bool):
        raise TaskError(
            f"{where(METADATA, key)}: expected a JSON {_JSON_NAMES[types]}, got {value!r}"
        )
    if allowed is not None and value not in allowed:
        raise TaskError(f"{where(METADATA, key)}: {value!r} is not one of {list(allowed)}")
    return value


_JSON_NAMES = {str: "string", int: "integer", list: "list", bool: "boolean"}


def _read_vocabulary(root: Path, where) -> list[str]:
    path = root / VOCABULARY
    if not path.is_file():
        raise TaskError(f"{where(VOCABULARY)}: missing")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"idx", "label"} <= set(reader.fieldnames):
            raise TaskError(
                f"{where(VOCABULARY)}: expected a header with columns 'idx,label', got {reader.fieldnames}"
            )
        rows = []
        for line, row in enumerate(reader, start=2):
            try:
                idx = int(row["idx"])
            except (TypeError, ValueError):
                raise TaskError(
                    f"{where(VOCABULARY, 'idx')}: line {line}: {row['idx']!r} is not an integer"
                ) from None
            if row["label"] is None or row["label"] == "":
                raise TaskError(f"{where(VOCABULARY, 'label')}: line {line}: empty label")
            rows.append((idx, row["label"]))
    if not rows:
        raise TaskError(f"{where(VOCABULARY)}: no labels")
    idxs = sorted(i for i, _ in rows)
    if idxs != list(range(len(rows))):
        raise TaskError(
            f"{where(VOCABULARY, 'idx')}: indices must be 0..{len(rows) - 1} without gaps or repeats"
        )
    labels = [label for _, label in sorted(rows)]
    if len(set(labels)) != len(labels):
        dup = sorted({lab for lab in labels if labels.count(lab) > 1})
        raise TaskError(f"{where(VOCABULARY, 'label')}: repeated labels {dup}")
    return labels


def _audio_root(root: Path, where) -> tuple[Path, int]:
    rate_dirs = sorted(
        (p for p in root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
    )
    if not rate_dirs:
        raise TaskError(
            f"{where('<sample_rate>/')}: no audio folder (expected one of "
            f"{[str(r) for r in SUPPORTED_RATES]} holding <split>/*.wav)"
        )
    usable = [p for p in rate_dirs if int(p.name) in SUPPORTED_RATES]
    if not usable:
        raise TaskError(
            f"{where(rate_dirs[0].name + '/')}: unsupported sample rate "
            f"{[int(p.name) for p in rate_dirs]} Hz; HEAR tasks come at {list(SUPPORTED_RATES)} Hz"
        )
    # 16 kHz needs no resampling; otherwise the highest rate (resampled by ffmpeg).
    best = next((p for p in usable if int(p.name) == audio.SAMPLE_RATE), usable[-1])
    return best, int(best.name)


def _check_metrics(meta: dict, where) -> None:
    """``evaluation``: known metric names; an event task's primary metric is an event metric."""
    evaluation = _require(meta, "evaluation", where, list)
    if not evaluation or not all(isinstance(m, str) for m in evaluation):
        raise TaskError(
            f"{where(METADATA, 'evaluation')}: expected a non-empty list of metric names, got {evaluation!r}"
        )
    unknown = [m for m in evaluation if m not in SCENE_METRICS + EVENT_METRICS]
    if unknown:
        raise TaskError(
            f"{where(METADATA, 'evaluation')}: unknown metrics {unknown}; known: {list(SCENE_METRICS + EVENT_METRICS)}"
        )
    if meta["embedding_type"] == "event" and not evaluation[0].startswith(("event_", "segment_")):
        raise TaskError(
            f"{where(METADATA, 'evaluation')}: an event task's primary metric must be an event metric, "
            f"got {evaluation[0]!r}"
        )
    if meta["embedding_type"] == "event" and meta["prediction_type"] != "multilabel":
        raise TaskError(
            f"{where(METADATA, 'prediction_type')}: event tasks are multilabel, got {meta['prediction_type']!r}"
        )


def _check_splits(meta: dict, mode: str, where) -> list[str]:
    """``splits`` (and ``nfolds`` of a k-fold task): unique plain names that fit the split mode."""
    splits = _require(meta, "splits", where, list)
    if not all(isinstance(s, str) and s and "/" not in s and s not in (".", "..") for s in splits):
        raise TaskError(
            f"{where(METADATA, 'splits')}: expected a list of split names, got {splits!r}"
        )
    if len(set(splits)) != len(splits):
        raise TaskError(f"{where(METADATA, 'splits')}: repeated split names {splits}")
    if mode == "trainvaltest":
        if sorted(splits) != sorted(TRAINVALTEST):
            raise TaskError(
                f"{where(METADATA, 'splits')}: split_mode 'trainvaltest' needs splits "
                f"{list(TRAINVALTEST)}, got {splits}"
            )
        return splits
    nfolds = _require(meta, "nfolds", where, int)
    if nfolds < 3:
        raise TaskError(
            f"{where(METADATA, 'nfolds')}: k-fold tasks need at least 3 folds, got {nfolds}"
        )
    if len(splits) != nfolds:
        raise TaskError(f"{where(METADATA, 'splits')}: {len(splits)} splits but nfolds is {nfolds}")
    return splits


def _read_metadata(root: Path, where) -> dict:
    """``task_metadata.json``, every field checked; ``where`` names the task (by its
    ``task_name`` once read)."""
    meta_path = root / METADATA
    if not meta_path.is_file():
        raise TaskError(f"{where(METADATA)}: missing (not a HEAR task folder?)")
    meta = _read_object(meta_path, where(METADATA), "a JSON object")
    name = _require(meta, "task_name", where, str)
    if not name:
        raise TaskError(f"{where(METADATA, 'task_name')}: empty")
    where.task = name
    _require(meta, "embedding_type", where, str, EMBEDDING_TYPES)
    _require(meta, "prediction_type", where, str, PREDICTION_TYPES)
    mode = _require(meta, "split_mode", where, str, SPLIT_MODES)
    _check_metrics(meta, where)
    _check_splits(meta, mode, where)
    duration = meta.get("sample_duration")
    if duration is not None and (
        isinstance(duration, bool) or not isinstance(duration, (int, float)) or duration <= 0
    ):
        raise TaskError(
            f"{where(METADATA, 'sample_duration')}: expected seconds > 0 or null, got {duration!r}"
        )
    return meta


class _Where:
    """``task 'x', file 'y', field 'z'`` for the messages about a task folder."""

    def __init__(self, root: Path):
        self.root, self.task = root, root.name

    def __call__(self, filename: str, fieldname: str | None = None) -> str:
        text = f"task {self.task!r}, file {str(self.root / filename)!r}"
        return text + (f", field {fieldname!r}" if fieldname else "")


def load_task(root: str | os.PathLike) -> Task:
    """Read and validate a task folder's metadata and vocabulary (split files are read lazily)."""
    root = Path(root)
    if not root.is_dir():
        raise TaskError(f"task {root.name!r}: folder {str(root)!r} does not exist")
    where = _Where(root)
    meta = _read_metadata(root, where)
    vocabulary = _read_vocabulary(root, where)
    if meta["prediction_type"] == "multiclass" and len(vocabulary) < 2:
        raise TaskError(f"{where(VOCABULARY)}: a multiclass task needs at least 2 labels")
    audio_root, rate = _audio_root(root, where)
    missing = [s for s in meta["splits"] if not (audio_root / s).is_dir()]
    if missing:
        raise TaskError(f"{where(audio_root.name + '/')}: no audio folder for splits {missing}")
    return Task(
        root=root, metadata=meta, vocabulary=vocabulary, audio_root=audio_root, sample_rate=rate
    )


def load_audio(clip: Clip, sample_rate: int = audio.SAMPLE_RATE) -> np.ndarray:
    """A clip's audio, float32 mono at ``sample_rate`` (16 kHz), through ffmpeg."""
    return audio.decode(clip.path, sample_rate=sample_rate)
