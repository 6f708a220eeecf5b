"""HEAR's evaluation metrics (names as in ``task_metadata.json``'s ``evaluation`` list).

Scene metrics take ``target`` and ``scores`` of shape (n_clips, n_labels): one-hot / multi-hot
targets and the probe's probabilities. Event metrics take reference and estimated event lists
(``{"file", "label", "onset", "offset"}`` in seconds) and use sed_eval.

Library vs hand-written:
- ``mAP`` and ``aucroc``: scikit-learn (``average_precision_score`` / ``roc_auc_score``, macro, over
  the labels that occur in the target, as HEAR does).
- event F-measures and the segment error rate: sed_eval (``EventBasedMetrics``,
  ``SegmentBasedMetrics``), overall (micro) scores, as HEAR reports them.
- ``top1_acc``, ``pitch_acc``, ``chroma_acc`` and ``d_prime`` are written here: each is one line
  over numpy (argmax agreement; argmax agreement modulo 12 on MIDI-number labels;
  ``sqrt(2) * Φ⁻¹(AUC)`` per label, averaged), for which no maintained library has a function.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence

import numpy as np

SCENE_METRICS = ("top1_acc", "pitch_acc", "chroma_acc", "mAP", "d_prime", "aucroc")
EVENT_METRICS = (
    "event_onset_200ms_fms",
    "event_onset_50ms_fms",
    "event_onset_offset_50ms_20perc_fms",
    "segment_1s_er",
)
# Metrics where lower is better (everything else: higher is better).
LOWER_IS_BETTER = frozenset({"segment_1s_er"})


def _check(target: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    target, scores = np.asarray(target), np.asarray(scores, dtype=np.float64)
    if target.ndim != 2 or target.shape != scores.shape:
        raise ValueError(
            f"target and scores must both be (n, labels), got {target.shape} and {scores.shape}"
        )
    if target.shape[0] == 0:
        raise ValueError("no clips to score")
    return target, scores


def top1_acc(target: np.ndarray, scores: np.ndarray) -> float:
    """Fraction of clips whose highest-scoring label is (one of) its target label(s)."""
    target, scores = _check(target, scores)
    pred = scores.argmax(axis=1)
    return float(target[np.arange(len(pred)), pred].astype(bool).mean())


def pitch_acc(target: np.ndarray, scores: np.ndarray) -> float:
    """NSynth pitch accuracy: top-1 over pitch classes."""
    return top1_acc(target, scores)


def chroma_acc(target: np.ndarray, scores: np.ndarray, vocabulary: Sequence[str]) -> float:
    """Pitch accuracy up to the octave: predicted and true MIDI numbers agree modulo 12."""
    target, scores = _check(target, scores)
    try:
        pitches = np.array([int(float(v)) for v in vocabulary])
    except ValueError as exc:
        raise ValueError(
            f"chroma_acc needs MIDI-number labels, got vocabulary {list(vocabulary)[:5]}..."
        ) from exc
    pred = pitches[scores.argmax(axis=1)] % 12
    true = pitches[target.argmax(axis=1)] % 12
    return float((pred == true).mean())


def _present(target: np.ndarray) -> np.ndarray:
    """Labels that have at least one positive and one negative clip (AP/AUC are defined)."""
    pos = target.sum(axis=0)
    return (pos > 0) & (pos < target.shape[0])


def mean_average_precision(target: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import average_precision_score

    target, scores = _check(target, scores)
    keep = _present(target)
    if not keep.any():
        return float("nan")
    return float(average_precision_score(target[:, keep], scores[:, keep], average="macro"))


def aucroc(target: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    target, scores = _check(target, scores)
    keep = _present(target)
    if not keep.any():
        return float("nan")
    return float(roc_auc_score(target[:, keep], scores[:, keep], average="macro"))


def d_prime(target: np.ndarray, scores: np.ndarray) -> float:
    """Mean over labels of sqrt(2)·Φ⁻¹(AUC) (AUC clipped away from 0 and 1)."""
    from scipy.stats import norm
    from sklearn.metrics import roc_auc_score

    target, scores = _check(target, scores)
    keep = _present(target)
    if not keep.any():
        return float("nan")
    auc = roc_auc_score(target[:, keep], scores[:, keep], average=None)
    auc = np.clip(np.atleast_1d(auc), 1e-6, 1 - 1e-6)
    return float(np.mean(math.sqrt(2.0) * norm.ppf(auc)))


def scene_score(
    metric: str, target: np.ndarray, scores: np.ndarray, vocabulary: Sequence[str]
) -> float:
    if metric == "top1_acc":
        return top1_acc(target, scores)
    if metric == "pitch_acc":
        return pitch_acc(target, scores)
    if metric == "chroma_acc":
        return chroma_acc(target, scores, vocabulary)
    if metric == "mAP":
        return mean_average_precision(target, scores)
    if metric == "d_prime":
        return d_prime(target, scores)
    if metric == "aucroc":
        return aucroc(target, scores)
    raise ValueError(f"unknown scene metric {metric!r}; expected one of {SCENE_METRICS}")


# -- events ----------------------------------------------------------------------------------------


def _container(events: Iterable[dict]):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dcase_util imports pkg_resources
        import dcase_util

    return dcase_util.containers.MetaDataContainer(
        [
            {
                "filename": e["file"],
                "event_label": e["label"],
                "onset": float(e["onset"]),
                "offset": float(e["offset"]),
            }
            for e in events
        ]
    )


def event_score(
    metric: str,
    reference: list[dict],
    estimated: list[dict],
    labels: Sequence[str],
    files: Sequence[str],
) -> float:
    """An event metric over ``files`` (every file is scored, also those without any event)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import sed_eval

    labels = list(labels)
    if metric == "segment_1s_er":
        m = sed_eval.sound_event.SegmentBasedMetrics(event_label_list=labels, time_resolution=1.0)
    else:
        params = {
            "event_onset_200ms_fms": dict(
                t_collar=0.2, percentage_of_length=0.0, evaluate_offset=False
            ),
            "event_onset_50ms_fms": dict(
                t_collar=0.05, percentage_of_length=0.0, evaluate_offset=False
            ),
            "event_onset_offset_50ms_20perc_fms": dict(
                t_collar=0.05, percentage_of_length=0.2, evaluate_offset=True
            ),
        }.get(metric)
        if params is None:
            raise ValueError(f"unknown event metric {metric!r}; expected one of {EVENT_METRICS}")
        m = sed_eval.sound_event.EventBasedMetrics(
            event_label_list=labels, evaluate_onset=True, **params
        )
    by_file_ref: dict[str, list] = {f: [] for f in files}
    by_file_est: dict[str, list] = {f: [] for f in files}
    for e in reference:
        by_file_ref.setdefault(e["file"], []).append(e)
    for e in estimated:
        by_file_est.setdefault(e["file"], []).append(e)
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", RuntimeWarning
        )  # sed_eval's class-wise means over empty classes
        for f in by_file_ref:
            m.evaluate(
                reference_event_list=_container(by_file_ref[f]),
                estimated_event_list=_container(by_file_est.get(f, [])),
            )
        results = m.results()
    if metric == "segment_1s_er":
        return float(results["overall"]["error_rate"]["error_rate"])
    return float(results["overall"]["f_measure"]["f_measure"])


def is_better(metric: str, new: float, old: float | None) -> bool:
    if old is None or (isinstance(old, float) and math.isnan(old)):
        return not math.isnan(new)
    if math.isnan(new):
        return False
    return new < old if metric in LOWER_IS_BETTER else new > old
