"""X-ARES task data (webdataset tar shards) → a HEAR task folder: ``python -m dasheng_pipeline.evaluation.tasks.xares``.

An X-ARES task (https://github.com/jimbozhang/xares, PyPI ``xares``) is a folder of webdataset tar
shards: each sample is an audio member (``flac``, ``wav``, ``mp3``, ``ogg``, ``m4a``, ``wma``,
``opus``) and a ``json`` member holding the label under the field the task names. Splits are file
name patterns: ``{split}*.tar`` for train / valid / test (``splits: {train: wds-audio-train, ...}``),
or one pattern per fold (``folds: [1, 2, 3, 4, 5]``, ``fold_pattern: wds-audio-fold-{fold}-*.tar``).
Kinds:

- ``multiclass``: one label per clip (a string or a number);
- ``multilabel``: a JSON list of labels, or a string cut at ``label_sep`` (FSD50K: ``";"``);
- ``frame`` (DESED-style): a list of ``{onset, offset, label}`` (seconds; ``label`` may hold
  several labels joined by ``label_sep``), under the label field or as the whole JSON (``label: null``).

The shards are read with the ``webdataset`` library, one shard at a time, and written out as a HEAR
task folder (``task_metadata.json`` with an ``xares`` block, ``labelvocabulary.csv``,
``<split>.json``, the audio members' bytes as they are under ``16000/<split>/``), so the rest of the
evaluation stage (embeddings through the project's ffmpeg path, HEAR probe, k-NN, the X-ARES
protocols) reads it like any other task. Audio is not decoded here: the embedding job decodes it
with ffmpeg to 16 kHz and rejects what does not decode.

Bad input never stops the job: an unreadable or truncated shard, a sample without audio or JSON,
invalid JSON, a missing label field, a label outside ``labels`` (when the config lists them) or a
malformed event is skipped and listed in ``rejects.json`` (split, key, shard, reason) and in the log.
Only a missing folder, a pattern that matches no shard, or a split left with no usable sample is an
error (a :class:`TaskError` naming the task, the folder and the pattern).
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dasheng_pipeline.common import atomic, logs, provenance
from dasheng_pipeline.evaluation.tasks.hear import TaskError, normalise_label

log = logging.getLogger(__name__)

AUDIO_KEYS = ("flac", "wav", "mp3", "ogg", "m4a", "wma", "opus", "sox")
KINDS = ("multiclass", "multilabel", "frame")
DEFAULT_FOLD_PATTERN = "wds-audio-fold-{fold}-*.tar"
DEFAULT_SPLIT_PATTERN = "{split}*.tar"
XARES_METRIC = {"multiclass": "accuracy", "multilabel": "mAP", "frame": "segmentf1_macro"}
HEAR_EVALUATION = {
    "multiclass": ["top1_acc"],
    "multilabel": ["mAP", "d_prime"],
    "frame": ["event_onset_200ms_fms", "segment_1s_er"],
}
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class XaresSpec:
    """One X-ARES task as the config names it (``evaluation.tasks.<name>`` with ``format: xares``)."""

    name: str
    path: str
    label: str | None = "label"
    kind: str = "multiclass"
    splits: dict[str, str] | None = None  # role (train/valid/test) -> pattern stem
    folds: list[int | str] | None = None
    fold_pattern: str = DEFAULT_FOLD_PATTERN
    split_pattern: str = DEFAULT_SPLIT_PATTERN
    labels: list[str] | None = (
        None  # the vocabulary in index order (None: every value found, sorted)
    )
    label_sep: str | None = None
    weight: int | None = None  # X-ARES's eval_weight (None: the test clips)
    xares_name: str | None = None  # the task's name in the published X-ARES results
    domain: str | None = None
    mlp: dict = field(
        default_factory=dict
    )  # per-task X-ARES MLP overrides (epochs, lr, batch_size)

    @classmethod
    def from_config(cls, name: str, cfg: dict) -> XaresSpec:
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in cfg.items() if k in known and v is not None}
        spec = cls(name=name, **{k: v for k, v in values.items() if k != "name"})
        if "label" in cfg and cfg["label"] is None:
            spec.label = None
        spec.validate()
        return spec

    def validate(self) -> None:
        where = f"task {self.name!r}"
        if self.kind not in KINDS:
            raise TaskError(f"{where}, field 'kind': {self.kind!r} is not one of {list(KINDS)}")
        if (self.splits is None) == (self.folds is None):
            raise TaskError(
                f"{where}: name exactly one of 'splits' ({{train, valid, test}}) or 'folds'"
            )
        if self.splits is not None:
            missing = [r for r in ("train", "valid", "test") if not self.splits.get(r)]
            if missing:
                raise TaskError(
                    f"{where}, field 'splits': missing {missing} (each names a shard pattern)"
                )
        if self.folds is not None and len(self.folds) < 3:
            raise TaskError(f"{where}, field 'folds': at least 3 folds, got {self.folds!r}")
        if self.folds is not None and "{fold}" not in self.fold_pattern:
            raise TaskError(
                f"{where}, field 'fold_pattern': {self.fold_pattern!r} lacks '{{fold}}'"
            )
        if self.kind != "frame" and self.label is None:
            raise TaskError(
                f"{where}, field 'label': a clip task needs the JSON field holding the label"
            )

    # -- split roles ---------------------------------------------------------------------------
    def split_names(self) -> list[str]:
        """The HEAR split names: train/valid/test, or fold<id> per fold."""
        return (
            ["train", "valid", "test"] if self.folds is None else [f"fold{f}" for f in self.folds]
        )

    def pattern(self, split: str) -> str:
        if self.folds is None:
            return self.split_pattern.format(split=self.splits[split])
        return self.fold_pattern.format(
            fold=self.folds[self.split_names().index(split)]
        )  # {fold:02d} works


@dataclass(frozen=True)
class Sample:
    split: str
    key: str
    shard: str
    audio_ext: str
    audio: bytes
    target: Any  # label list (clip tasks) or events (frame tasks), before vocabulary checks


def shards(spec: XaresSpec, split: str) -> list[Path]:
    root = Path(spec.path)
    pattern = spec.pattern(split)
    found = sorted(p for p in root.glob(pattern) if p.is_file())
    if not found:
        raise TaskError(
            f"task {spec.name!r}, folder {str(root)!r}: no shard matches {pattern!r} (split {split!r}); "
            "download the task's tar files there or fix the pattern in the config"
        )
    return found


def read_shard(path: Path, spec: XaresSpec, split: str, rejects: list[dict]) -> list[Sample]:
    """Samples of one shard (webdataset); bad samples and a bad shard's remainder go to ``rejects``."""
    import webdataset as wds

    out: list[Sample] = []
    shard = path.name
    try:
        for sample in wds.WebDataset(str(path), shardshuffle=False, empty_check=False):
            key = str(sample.get("__key__", ""))
            reason, item = _sample(sample, spec, split, shard)
            if reason:
                rejects.append({"split": split, "file": key, "shard": shard, "reason": reason})
            else:
                out.append(item)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a damaged shard: reject, go on
        rejects.append(
            {
                "split": split,
                "file": "",
                "shard": shard,
                "reason": f"unreadable shard after {len(out)} samples: {type(exc).__name__}: {exc}",
            }
        )
    return out


def _sample(
    sample: dict, spec: XaresSpec, split: str, shard: str
) -> tuple[str | None, Sample | None]:
    ext = next((k for k in AUDIO_KEYS if k in sample), None)
    if ext is None:
        return (
            f"no audio member (expected one of {list(AUDIO_KEYS)}; "
            f"has {sorted(k for k in sample if not k.startswith('__'))})",
            None,
        )
    if "json" not in sample:
        return "no json member (the labels)", None
    try:
        meta = json.loads(bytes(sample["json"]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"invalid json member: {exc}", None
    if spec.label is None:
        raw = meta
    elif not isinstance(meta, dict) or spec.label not in meta:
        return f"json has no field {spec.label!r}", None
    else:
        raw = meta[spec.label]
    if spec.kind == "frame":
        target, reason = _events(raw, spec.label_sep)
    else:
        target, reason = _labels(raw, spec)
    if reason:
        return reason, None
    return None, Sample(split, str(sample["__key__"]), shard, ext, bytes(sample[ext]), target)


def _split_label(raw: Any, sep: str | None) -> list[Any]:
    if isinstance(raw, str) and sep:
        return [p.strip() for p in raw.split(sep) if p.strip()]
    return [raw]


def _labels(raw: Any, spec: XaresSpec) -> tuple[list[str] | None, str | None]:
    values = raw if isinstance(raw, list) else _split_label(raw, spec.label_sep)
    out = []
    for v in values:
        label = normalise_label(v)
        if label is None:
            return None, f"label {v!r} is neither a string nor a number"
        out.append(label)
    if not out:
        return None, "no label"
    if spec.kind == "multiclass" and len(out) != 1:
        return None, f"a multiclass task needs one label, got {out}"
    return sorted(set(out)), None


def _events(raw: Any, sep: str | None) -> tuple[list[dict] | None, str | None]:
    if not isinstance(raw, list):
        return None, f"expected a list of {{onset, offset, label}} events, got {type(raw).__name__}"
    out = []
    for i, ev in enumerate(raw):
        if not isinstance(ev, dict) or not {"onset", "offset", "label"} <= set(ev):
            return None, f"event {i}: expected {{onset, offset, label}}, got {ev!r}"
        on, off = ev["onset"], ev["offset"]
        if any(
            isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0
            for t in (on, off)
        ):
            return None, f"event {i}: onset/offset must be seconds >= 0, got {on!r}, {off!r}"
        if off < on:
            return None, f"event {i}: offset {off} s is before onset {on} s"
        for lab in _split_label(ev["label"], sep):
            label = normalise_label(lab)
            if label is None:
                return None, f"event {i}: label {lab!r} is neither a string nor a number"
            out.append({"label": label, "start": float(on) * 1000, "end": float(off) * 1000})
    return out, None


def vocabulary(spec: XaresSpec, samples: list[Sample]) -> list[str]:
    if spec.labels is not None:
        return [normalise_label(v) or str(v) for v in spec.labels]
    found = (
        {ev["label"] for s in samples for ev in s.target}
        if spec.kind == "frame"
        else {lab for s in samples for lab in s.target}
    )
    if all(re.fullmatch(r"-?\d+", v) for v in found):
        return sorted(found, key=int)
    return sorted(found)


def file_name(key: str, ext: str) -> str:
    """A plain file name for a sample key (keys may hold '/' or odd characters)."""
    return (_SAFE.sub("_", key).strip("._") or "clip") + "." + ext


def read_splits(spec: XaresSpec, rejects: list[dict]) -> dict[str, list[Sample]]:
    """Every split's samples, shard by shard; bad samples and shards go to ``rejects``."""
    from tqdm import tqdm

    per_split: dict[str, list[Sample]] = {}
    for split in spec.split_names():
        samples: list[Sample] = []
        for path in tqdm(
            shards(spec, split),
            desc=f"{spec.name}/{split}",
            unit="shard",
            file=sys.stdout,
            mininterval=5,
        ):
            samples += read_shard(path, spec, split, rejects)
        per_split[split] = samples
    return per_split


def write_split(
    spec: XaresSpec, split: str, samples: list[Sample], vocab: list[str], out: Path, rejects: list
) -> dict[str, Any]:
    """Write a split's audio under ``16000/<split>/`` and return its ``<split>.json`` mapping;
    samples with unknown labels or a repeated file name go to ``rejects``."""
    known = set(vocab)
    audio_dir = out / "16000" / split
    if audio_dir.exists():
        shutil.rmtree(audio_dir)
    audio_dir.mkdir(parents=True)
    mapping: dict[str, Any] = {}
    for s in samples:
        labels = [ev["label"] for ev in s.target] if spec.kind == "frame" else s.target
        unknown = sorted(set(labels) - known)
        name = file_name(s.key, s.audio_ext)
        reason = None
        if unknown:
            reason = (
                f"label(s) {unknown} not in the task's labels ({len(vocab)}); "
                "add them to 'labels' or fix the data"
            )
        elif name in mapping:
            reason = f"duplicate key in split {split!r} (file name {name!r})"
        if reason:
            rejects.append({"split": split, "file": s.key, "shard": s.shard, "reason": reason})
            continue
        # the folder is the job's output: atomic as a whole
        (audio_dir / name).write_bytes(s.audio)
        mapping[name] = s.target
    return mapping


def task_metadata(
    spec: XaresSpec, contents: dict[str, dict], rejects: list[dict], stamp: dict
) -> dict:
    """``task_metadata.json`` of the converted task, with its ``xares`` block."""
    splits = spec.split_names()
    n_test = (
        len(contents["test"])
        if spec.folds is None
        else round(sum(len(contents[s]) for s in splits) / len(splits))
    )
    return {
        "task_name": spec.name,
        "version": "xares",
        "mode": None,
        "embedding_type": "event" if spec.kind == "frame" else "scene",
        "prediction_type": "multiclass" if spec.kind == "multiclass" else "multilabel",
        "split_mode": "trainvaltest" if spec.folds is None else "presplit_kfold",
        "evaluation": HEAR_EVALUATION[spec.kind],
        "splits": splits,
        "domain": spec.domain,
        "clips": sum(len(v) for v in contents.values()),
        **({"nfolds": len(splits)} if spec.folds is not None else {}),
        "xares": {
            "kind": spec.kind,
            "metric": XARES_METRIC[spec.kind],
            "folds": spec.folds is not None,
            "weight": int(spec.weight) if spec.weight is not None else int(n_test),
            "test_clips": int(n_test),
            "name": spec.xares_name or spec.name,
            "source": str(Path(spec.path)),
            "patterns": {split: spec.pattern(split) for split in splits},
            "valid_is_test": spec.folds is None and spec.splits["valid"] == spec.splits["test"],
            "mlp": dict(spec.mlp),
            "rejected": len(rejects),
        },
        "provenance": stamp,
    }


def convert(spec: XaresSpec, out: str | Path, seed: int, params: dict | None = None) -> dict:
    """Read the task's shards and write the HEAR task folder ``out``; returns its metadata
    (``params``: what the provenance stamp hashes, the job's params; by default the DAG's
    ``{"seed": seed}``)."""
    root = Path(spec.path)
    if not root.is_dir():
        raise TaskError(
            f"task {spec.name!r}: folder {str(root)!r} does not exist (download the X-ARES task there)"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic.clean_stale_temps(out)
    rejects: list[dict] = []
    per_split = read_splits(spec, rejects)
    vocab = vocabulary(spec, [s for v in per_split.values() for s in v])
    contents: dict[str, dict] = {}
    for split, samples in per_split.items():
        mapping = write_split(spec, split, samples, vocab, out, rejects)
        if not mapping:
            atomic.write_json(out / "rejects.json", {"rejects": rejects})
            raise TaskError(
                f"task {spec.name!r}, folder {str(root)!r}, pattern {spec.pattern(split)!r}: no usable "
                f"sample in split {split!r} ({sum(r['split'] == split for r in rejects)} rejected, "
                f"see {out / 'rejects.json'})"
            )
        contents[split] = mapping
        atomic.write_json(out / f"{split}.json", mapping)
    for r in rejects:
        log.warning(
            f"task {spec.name!r}, split {r['split']!r}, shard {r['shard']!r}: skipped {r['file']!r}: {r['reason']}"
        )
    atomic.write_json(out / "rejects.json", {"rejects": rejects})
    with atomic.atomic_open(out / "labelvocabulary.csv", "w", encoding="utf-8", newline="") as fh:
        fh.write(
            "idx,label\n" + "".join(f"{i},{_csv_cell(label)}\n" for i, label in enumerate(vocab))
        )
    stamp = provenance.stamp({"seed": seed} if params is None else params, seed)
    meta = task_metadata(spec, contents, rejects, stamp)
    atomic.write_json(out / "task_metadata.json", meta)
    log.info(
        f"{spec.name}: {meta['clips']} clips, {len(vocab)} labels, rejected {len(rejects)}; splits "
        + ", ".join(f"{s} {len(contents[s])}" for s in spec.split_names())
    )
    return meta


def _csv_cell(label: str) -> str:
    return '"' + label.replace('"', '""') + '"' if any(c in label for c in ',"\n') else label


def write_shards(
    samples: list[tuple[str, str, bytes, Any]], pattern: str | Path, per_shard: int = 1000
) -> list[Path]:
    """Write X-ARES shards: ``samples`` are (key, audio extension, audio bytes, json object), ``pattern``
    a path with one ``*`` that becomes the shard number (``.../wds-audio-fold-1-*.tar``). Used by the
    demo's X-ARES tasks and the tests; byte-identical for the same samples (fixed member times)."""
    import webdataset as wds

    pattern = str(pattern)
    paths = []
    for n, start in enumerate(range(0, max(1, len(samples)), per_shard)):
        path = Path(pattern.replace("*", f"{n:06d}"))
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic.atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                with wds.TarWriter(fh, mtime=0.0) as sink:
                    for key, ext, data, meta in samples[start : start + per_shard]:
                        sink.write(
                            {"__key__": key, ext: data, "json": json.dumps(meta).encode("utf-8")}
                        )
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = logs.entry_parser("dasheng_pipeline.evaluation.tasks.xares", __doc__)
    parser.add_argument("--name", required=True, help="task name (the config key)")
    parser.add_argument(
        "--spec",
        required=True,
        help="JSON: the task's config (path, label, kind, splits|folds, ...)",
    )
    parser.add_argument("--params", required=True, help="JSON: seed (and anything to stamp)")
    parser.add_argument("--out", required=True, help="HEAR task folder to write")
    args = parser.parse_args(argv)
    logs.setup()
    params = json.loads(args.params)
    with logs.one_line_errors(TaskError):
        convert(
            XaresSpec.from_config(args.name, json.loads(args.spec)),
            args.out,
            int(params["seed"]),
            params,
        )


if __name__ == "__main__":
    main()
