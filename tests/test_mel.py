import numpy as np
import pytest
import torch
import torchaudio

from pipeline import mel

P = mel.MelParams()


def reference(wave: np.ndarray) -> np.ndarray:
    """Dasheng's front end, spelled out with torchaudio's own transforms, one clip at a time."""
    spec = torchaudio.transforms.MelSpectrogram(16000, n_fft=512, win_length=512, hop_length=160, n_mels=64,
                                                f_min=0, f_max=8000, center=True)
    to_db = torchaudio.transforms.AmplitudeToDB(top_db=120)
    return to_db(spec(torch.from_numpy(wave)[None]))[0].numpy()


def test_ten_seconds_is_1001_frames():
    assert P.window_samples == 160000 and P.window_frames == 1001
    out = mel.LogMel(P)(torch.zeros(1, 160000) + 0.01)
    assert out.shape == (1, 64, 1001)


def test_logmel_matches_torchaudio_per_clip():
    rng = np.random.default_rng(0)
    waves = [rng.standard_normal(160000).astype(np.float32) * s for s in (0.5, 0.01)]
    batch = mel.LogMel(P)(torch.from_numpy(np.stack(waves))).numpy()
    for i, wave in enumerate(waves):
        np.testing.assert_allclose(batch[i], reference(wave), atol=1e-3)


def test_top_db_is_per_clip_not_per_batch():
    rng = np.random.default_rng(1)
    loud = rng.standard_normal(160000).astype(np.float32)
    quiet_with_silence = np.zeros(160000, np.float32)
    quiet_with_silence[:16000] = rng.standard_normal(16000) * 1e-4
    logmel = mel.LogMel(P)
    alone = logmel(torch.from_numpy(quiet_with_silence)[None])[0]
    together = logmel(torch.from_numpy(np.stack([loud, quiet_with_silence])))[1]
    torch.testing.assert_close(alone, together, atol=1e-3, rtol=0)
    # torchaudio on a (B, F, T) batch clamps against the batch's maximum: the quirk we avoid.
    spec = torchaudio.transforms.MelSpectrogram(16000, n_fft=512, hop_length=160, n_mels=64)
    quirky = torchaudio.transforms.AmplitudeToDB(top_db=120)(spec(torch.from_numpy(np.stack([loud, quiet_with_silence]))))[1]
    assert (quirky - alone).abs().max() > 1.0


@pytest.mark.parametrize(
    "seconds, expected",
    [(5.0, [(0, 80000)]), (10.0, [(0, 160000)]), (25.0, [(0, 160000), (160000, 160000), (320000, 80000)]),
     (20.5, [(0, 160000), (160000, 160000)]), (0.5, [(0, 8000)])],
)
def test_windows_and_short_tails(seconds, expected):
    samples = np.ones(int(seconds * 16000), np.float32)
    windows = mel.split_windows(samples, P, min_tail_s=1.0)
    assert [(start, piece.size) for start, piece in windows] == expected


def test_partial_window_frames_equal_the_unpadded_computation():
    rng = np.random.default_rng(2)
    piece = (rng.standard_normal(48000) * 0.1).astype(np.float32)
    [(padded, valid)] = mel.compute(mel.LogMel(P), [piece])
    assert valid == 48000 // 160 + 1 == 301
    assert padded.shape == (64, 1001)
    np.testing.assert_allclose(padded[:, :valid], reference(piece), atol=1e-3)
    assert np.all(padded[:, valid:] == padded[:, :valid].min())


def test_batched_and_single_computations_agree():
    rng = np.random.default_rng(3)
    pieces = [(rng.standard_normal(n) * 0.1).astype(np.float32) for n in (160000, 30000, 160000)]
    logmel = mel.LogMel(P)
    together = mel.compute(logmel, pieces)
    for piece, (m, valid) in zip(pieces, together):
        [(alone, valid_alone)] = mel.compute(logmel, [piece])
        assert valid == valid_alone
        np.testing.assert_allclose(m, alone, atol=1e-3)
