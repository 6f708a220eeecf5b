"""DATA → labelled examples (a folder of class folders, or a CSV), and their train/valid/test splits."""

from __future__ import annotations

import csv
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dasheng_pipeline.tools import inputs

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")


class FinetuneError(ValueError):
    """DATA or an argument that cannot be used (one line: what is wrong, what to do)."""


@dataclass(frozen=True)
class Example:
    item: inputs.Item
    labels: tuple[str, ...]
    split: str | None = None  # from the CSV


@dataclass
class Data:
    examples: list[Example]
    labels: list[str]
    multilabel: bool
    rejects: list[tuple[str, str]] = field(default_factory=list)  # (what, reason)


def _from_folder(folder: Path) -> Data:
    classes = sorted(
        d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(("_", "."))
    )
    left_out = sorted(
        d.name for d in folder.iterdir() if d.is_dir() and d.name.startswith(("_", "."))
    )
    if left_out:
        log.info(
            f"{folder}: left out {', '.join(left_out)} (folders starting with _ or . are not classes)"
        )
    examples, rejects = [], []
    for d in classes:
        items, bad = inputs.collect([d])
        examples += [Example(i, (d.name,)) for i in items]
        rejects += [(r.path, r.reason) for r in bad]
    used = {e.labels[0] for e in examples}
    empty = [d.name for d in classes if d.name not in used]
    if empty:
        log.warning(f"{folder}: no audio files in {', '.join(empty)}; not classes")
    return Data(examples, [d.name for d in classes if d.name in used], False, rejects)


def _from_csv(path: Path) -> Data:
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))
    except (OSError, UnicodeDecodeError) as exc:
        raise FinetuneError(f"{path}: cannot read this CSV ({exc})") from exc
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if "path" not in header or "label" not in header:
        raise FinetuneError(
            f"{path}: expected a header row with the columns path,label[,split], got {header}"
        )
    ip, il = header.index("path"), header.index("label")
    isplit = header.index("split") if "split" in header else None
    examples, rejects, seen = [], [], {}
    for n, row in enumerate(rows[1:], start=2):
        cell = {
            k: (row[i].strip() if i is not None and i < len(row) else "")
            for k, i in (("path", ip), ("label", il), ("split", isplit))
        }
        labels = tuple(sorted({x.strip() for x in cell["label"].split(";") if x.strip()}))
        split = cell["split"].lower() if isplit is not None else None
        file = (
            Path(cell["path"]) if Path(cell["path"]).is_absolute() else path.parent / cell["path"]
        )
        if not cell["path"]:
            reason = "no path"
        elif not labels:
            reason = "no label"
        elif split is not None and split not in SPLITS:
            reason = f"split {split!r}: expected one of {', '.join(SPLITS)}"
        elif str(file) in seen:
            reason = f"{file} is listed twice (first on row {seen[str(file)]})"
        elif not file.is_file():
            reason = f"{file}: {'a folder, not a file' if file.is_dir() else 'no such file'}"
        elif file.suffix.lower() not in inputs.AUDIO_SUFFIXES:
            reason = f"{file}: not an audio file name (expected one of {' '.join(sorted(inputs.AUDIO_SUFFIXES))})"
        else:
            items, bad = inputs.collect([file])
            reason = bad[0].reason if bad else None
        if reason:
            rejects.append((f"{path} row {n}", reason))
            continue
        seen[str(file)] = n
        examples.append(Example(items[0], labels, split))
    labels = sorted({lab for e in examples for lab in e.labels})
    return Data(examples, labels, any(len(e.labels) > 1 for e in examples), rejects)


def read_data(data: str | Path) -> Data:
    """DATA (a folder of class folders, or a CSV) → examples, labels and the rows left out."""
    data = Path(data).expanduser()
    if data.is_dir():
        result = _from_folder(data)
    elif data.is_file() and data.suffix.lower() == ".csv":
        result = _from_csv(data)
    else:
        raise FinetuneError(
            f"DATA {data}: expected a folder with one subfolder per class, or a .csv file with "
            "the columns path,label[,split]"
        )
    if len(result.labels) < 2:
        raise FinetuneError(
            f"DATA {data}: found {len(result.labels)} class(es) with audio files "
            f"({len(result.examples)} files); a classifier needs at least 2"
        )
    given = {e.split for e in result.examples}
    if given != {None} and "train" not in given:
        raise FinetuneError(f"DATA {data}: the split column names no 'train' rows")
    return result


# -- splits ------------------------------------------------------------------------------------


def _split_per_class(
    keys: list[str], valid_fraction: float, test_fraction: float, seed: int
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    assign = np.full(len(keys), "train", dtype=object)
    for key in sorted(set(keys)):
        members = rng.permutation([i for i, k in enumerate(keys) if k == key])
        n = len(members)
        n_test = max(1, round(n * test_fraction)) if test_fraction > 0 and n >= 2 else 0
        n_valid = round(n * valid_fraction)
        keep = min(n - n_test, 2)  # two to train on before any validates, one at least
        n_valid = max(0, min(n_valid, n - n_test - keep))
        assign[members[:n_test]] = "test"
        assign[members[n_test : n_test + n_valid]] = "valid"
    return assign


def split_once(
    keys: list[str], valid_fraction: float, test_fraction: float, seed: int, stratify: bool = True
) -> np.ndarray:
    """One train/valid/test assignment (an array of split names) of examples with class ``keys``."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(keys))
    assign = np.full(len(keys), "train", dtype=object)
    try:
        rest = idx
        if test_fraction > 0:
            rest, test = train_test_split(
                idx, test_size=test_fraction, random_state=seed, stratify=keys if stratify else None
            )
            assign[test] = "test"
        if valid_fraction > 0:
            _, valid = train_test_split(
                rest,
                test_size=valid_fraction / (1 - test_fraction),
                random_state=seed,
                stratify=[keys[i] for i in rest] if stratify else None,
            )
            assign[valid] = "valid"
        return assign
    except ValueError as exc:
        if not stratify:
            raise FinetuneError(
                f"cannot split {len(keys)} examples into train/valid/test ({exc}); "
                "lower --valid-fraction/--test-fraction or give a split column"
            ) from exc
        counts = {k: keys.count(k) for k in set(keys)}
        small = sorted(k for k, c in counts.items() if c < 3)
        log.warning(
            f"a stratified split is impossible ({str(exc).split('.')[0]}); each class is split on its "
            f"own instead: {len(small)} of {len(counts)} classes have fewer than 3 examples "
            f"({sum(counts[k] == 1 for k in small)} with one, which only train and are never scored), "
            "classes of fewer than 4 give no validation example"
        )
        return _split_per_class(keys, valid_fraction, test_fraction, seed)


def split_folds(keys: list[str], k: int, seed: int, stratify: bool = True) -> list[np.ndarray]:
    """K assignments: fold i tests, fold i+1 validates (none for K=2), the rest trains."""
    import warnings

    from sklearn.model_selection import KFold, StratifiedKFold

    idx = np.arange(len(keys))
    if k > len(keys):
        raise FinetuneError(f"--folds {k}: more folds than examples ({len(keys)})")
    parts = None
    if stratify:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                parts = [
                    test
                    for _, test in StratifiedKFold(k, shuffle=True, random_state=seed).split(
                        idx, keys
                    )
                ]
            for w in caught:
                log.warning(f"--folds {k}: {w.message}")
        except ValueError as exc:
            log.warning(f"--folds {k}: stratified folds impossible ({exc}); plain K-fold instead")
    if parts is None:
        parts = [test for _, test in KFold(k, shuffle=True, random_state=seed).split(idx)]
    out = []
    for i in range(k):
        assign = np.full(len(keys), "train", dtype=object)
        if k > 2:
            assign[parts[(i + 1) % k]] = "valid"
        assign[parts[i]] = "test"
        out.append(assign)
    return out


def assign_splits(
    data: Data, folds: int, valid_fraction: float, test_fraction: float, seed: int, source
) -> list[np.ndarray]:
    """The split of every example, once per fold: the CSV's, else ``folds`` folds, else one split."""
    keys = [e.labels[0] for e in data.examples]
    if {e.split for e in data.examples} != {None}:
        if folds:
            log.warning(f"--folds {folds} ignored: {source} gives the splits")
        return [np.array([e.split for e in data.examples], dtype=object)]
    if folds:
        return split_folds(keys, folds, seed, stratify=not data.multilabel)
    return [split_once(keys, valid_fraction, test_fraction, seed, stratify=not data.multilabel)]


def targets(examples: list[Example], labels: list[str]) -> np.ndarray:
    """(n, C) float32 multi-hot rows, columns in ``labels`` order."""
    index = {lab: i for i, lab in enumerate(labels)}
    y = np.zeros((len(examples), len(labels)), np.float32)
    for i, e in enumerate(examples):
        y[i, [index[lab] for lab in e.labels]] = 1.0
    return y


def digest(data: Data) -> str:
    """sha256 of the examples as used (path, size, labels, split): the provenance's data hash."""
    h = hashlib.sha256()
    for e in data.examples:
        h.update(f"{e.item.path}\t{e.item.size}\t{';'.join(e.labels)}\t{e.split}\n".encode())
    return h.hexdigest()
