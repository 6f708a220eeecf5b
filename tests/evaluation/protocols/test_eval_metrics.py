"""Metric functions against values computed by hand."""

import math

import numpy as np
import pytest

from dasheng_pipeline.evaluation import metrics
from dasheng_pipeline.evaluation.protocols.hear_mlp import frames_to_events, median_frames


def test_top1_pitch_and_chroma_accuracy():
    vocab = ["60", "61", "72"]
    target = np.eye(3)[[0, 1, 2, 0]]
    scores = np.array(
        [
            [0.8, 0.1, 0.1],  # 60 → 60: right
            [0.1, 0.7, 0.2],  # 61 → 61: right
            [0.6, 0.3, 0.1],  # 72 → 60: wrong pitch, right chroma
            [0.1, 0.8, 0.1],
        ]
    )  # 60 → 61: wrong both
    assert metrics.top1_acc(target, scores) == 0.5
    assert metrics.pitch_acc(target, scores) == 0.5
    assert metrics.chroma_acc(target, scores, vocab) == 0.75
    assert metrics.scene_score("chroma_acc", target, scores, vocab) == 0.75
    with pytest.raises(ValueError, match="MIDI-number labels"):
        metrics.chroma_acc(target, scores, ["a", "b", "c"])


def test_map_aucroc_and_d_prime_by_hand():
    target = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    scores = np.array([[0.9, 0.2], [0.8, 0.7], [0.3, 0.6], [0.1, 0.4]])
    # label 0: ranked P N P N → AP = (1/1 + 2/3) / 2; label 1: ranked P P N N → AP = 1
    assert metrics.mean_average_precision(target, scores) == pytest.approx(
        ((1 + 2 / 3) / 2 + 1) / 2
    )
    # label 0: 3 of 4 positive/negative pairs ordered right; label 1: 4 of 4
    assert metrics.aucroc(target, scores) == pytest.approx((0.75 + 1.0) / 2)
    # d' = sqrt(2)·Φ⁻¹(AUC): AUC 0.75 → 0.953873
    one = target[:, :1], scores[:, :1]
    assert metrics.d_prime(*one) == pytest.approx(math.sqrt(2) * 0.6744897501960817, rel=1e-9)
    assert metrics.d_prime(np.array([[1], [0]]), np.array([[0.5], [0.5]])) == pytest.approx(
        0.0, abs=1e-12
    )
    # a label without positives is left out (HEAR does the same): mAP over label 0 only
    target2 = target.copy()
    target2[:, 1] = 0
    assert metrics.mean_average_precision(target2, scores) == pytest.approx((1 + 2 / 3) / 2)


REFERENCE = [
    {"file": "a", "label": "x", "onset": 1.0, "offset": 2.0},
    {"file": "a", "label": "y", "onset": 3.0, "offset": 4.0},
    {"file": "b", "label": "x", "onset": 0.5, "offset": 1.0},
]
ESTIMATED = [
    {"file": "a", "label": "x", "onset": 1.1, "offset": 2.0},  # onset 100 ms late
    {
        "file": "a",
        "label": "y",
        "onset": 3.5,
        "offset": 4.0,
    },  # onset 500 ms late: a miss and a false alarm
    {"file": "b", "label": "x", "onset": 0.52, "offset": 0.95},  # onset 20 ms late
    {"file": "b", "label": "y", "onset": 2.0, "offset": 2.5},  # a false alarm
]


def test_event_onset_f_measures_by_hand():
    labels, files = ["x", "y"], ["a", "b", "c"]  # c: no events at all, still scored
    # 200 ms collar: TP 2 (a.x, b.x), FP 2, FN 1 → F = 2·2 / (2·2 + 2 + 1) = 4/7
    assert metrics.event_score(
        "event_onset_200ms_fms", REFERENCE, ESTIMATED, labels, files
    ) == pytest.approx(4 / 7)
    # 50 ms collar: TP 1 (b.x), FP 3, FN 2 → F = 2 / (2 + 3 + 2) = 2/7
    assert metrics.event_score(
        "event_onset_50ms_fms", REFERENCE, ESTIMATED, labels, files
    ) == pytest.approx(2 / 7)
    # 1 s segments: every reference segment is found, one inserted (b, y, 2-3 s): ER = 1/3
    assert metrics.event_score(
        "segment_1s_er", REFERENCE, ESTIMATED, labels, files
    ) == pytest.approx(1 / 3)
    # perfect estimates
    assert metrics.event_score("event_onset_200ms_fms", REFERENCE, REFERENCE, labels, files) == 1.0
    with pytest.raises(ValueError, match="unknown event metric"):
        metrics.event_score("event_f1", REFERENCE, ESTIMATED, labels, files)


def test_event_post_processing_threshold_median_filter_min_duration():
    T = 20
    ts = np.arange(T) * 40.0 + 15.0  # Dasheng's frame centres
    probs = np.full((T, 1), 0.1)
    probs[5:13, 0] = 0.9  # frames 5..12 active (8 frames)
    probs[17, 0] = 0.8  # a one-frame spike: removed by the 250 ms median filter
    assert median_frames(250, 40) == 7
    events = frames_to_events(probs, ts, ["dog"], "f.wav", 0.5, 7, 125)
    assert events == [
        {
            "file": "f.wav",
            "label": "dog",
            "onset": pytest.approx(0.195),
            "offset": pytest.approx(0.515),
        }
    ]
    # the event lasts 320 ms: a 400 ms minimum drops it
    assert frames_to_events(probs, ts, ["dog"], "f.wav", 0.5, 7, 400) == []
    # without the median filter the spike is an event of its own (one 40 ms frame: 675-715 ms)
    raw = frames_to_events(probs, ts, ["dog"], "f.wav", 0.5, 1, 30)
    assert len(raw) == 2 and (raw[1]["onset"], raw[1]["offset"]) == (
        pytest.approx(0.675),
        pytest.approx(0.715),
    )


def test_lower_is_better():
    assert metrics.is_better("segment_1s_er", 0.2, 0.3) and not metrics.is_better(
        "top1_acc", 0.2, 0.3
    )
    assert metrics.is_better("top1_acc", 0.0, None) and not metrics.is_better(
        "top1_acc", float("nan"), 0.1
    )
