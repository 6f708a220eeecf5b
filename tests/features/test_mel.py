"""The feature stage's windowing and mel computation (the front end itself is tested in
tests/model/test_model_frontend.py: the feature stage uses the model's own LogMel)."""

import numpy as np
import pytest
import torch
import torchaudio

from dasheng_model.frontend import MEL_PARAMS, LogMel
from dasheng_pipeline.features import mel

W = mel.Windowing(window_s=10.0, min_tail_s=1.0)


def reference(wave: np.ndarray) -> np.ndarray:
    """Dasheng's front end, spelled out with torchaudio's own transforms, one clip at a time."""
    spec = torchaudio.transforms.MelSpectrogram(
        16000,
        n_fft=512,
        win_length=512,
        hop_length=160,
        n_mels=64,
        f_min=0,
        f_max=8000,
        center=True,
    )
    to_db = torchaudio.transforms.AmplitudeToDB(top_db=120)
    return to_db(spec(torch.from_numpy(wave)[None]))[0].numpy()


def test_ten_seconds_is_1001_frames_and_shards_record_the_model_front_end():
    assert W.window_samples == 160000 and W.window_frames == 1001
    assert W.shard_params() == {**MEL_PARAMS, "window_s": 10.0}
    [(m, valid)] = mel.compute(LogMel(), [np.full(160000, 0.01, np.float32)], W)
    assert m.shape == (64, 1001) and valid == 1001


@pytest.mark.parametrize(
    "seconds, expected",
    [
        (5.0, [(0, 80000)]),
        (10.0, [(0, 160000)]),
        (25.0, [(0, 160000), (160000, 160000), (320000, 80000)]),
        (20.5, [(0, 160000), (160000, 160000)]),
        (0.5, [(0, 8000)]),
    ],
)
def test_windows_and_short_tails(seconds, expected):
    samples = np.ones(int(seconds * 16000), np.float32)
    windows = mel.split_windows(samples, W)
    assert [(start, piece.size) for start, piece in windows] == expected


def test_partial_window_frames_equal_the_unpadded_computation():
    rng = np.random.default_rng(2)
    piece = (rng.standard_normal(48000) * 0.1).astype(np.float32)
    [(padded, valid)] = mel.compute(LogMel(), [piece], W)
    assert valid == 48000 // 160 + 1 == 301
    assert padded.shape == (64, 1001)
    np.testing.assert_allclose(padded[:, :valid], reference(piece), atol=1e-3)
    assert np.all(padded[:, valid:] == padded[:, :valid].min())


def test_batched_and_single_computations_agree():
    rng = np.random.default_rng(3)
    pieces = [(rng.standard_normal(n) * 0.1).astype(np.float32) for n in (160000, 30000, 160000)]
    logmel = LogMel()
    together = mel.compute(logmel, pieces, W)
    for piece, (m, valid) in zip(pieces, together):
        [(alone, valid_alone)] = mel.compute(logmel, [piece], W)
        assert valid == valid_alone
        np.testing.assert_allclose(m, alone, atol=1e-3)
