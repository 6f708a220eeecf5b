"""Front end: torchaudio mel + per-clip dB, init_bn, key names."""

from __future__ import annotations

import torch
import torchaudio
from model_testutil import noise

from dasheng_model.frontend import MEL_PARAMS, LogMel, MelBatchNorm


def reference_db(wav: torch.Tensor) -> torch.Tensor:
    """Clip by clip through torchaudio's own transforms (no batch effects possible)."""
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=16000, n_fft=512, win_length=512, hop_length=160, f_min=0, f_max=8000, n_mels=64
    )
    to_db = torchaudio.transforms.AmplitudeToDB(top_db=120)
    return torch.stack([to_db(mel(w[None]))[0] for w in wav])


def test_shapes_and_values_match_torchaudio():
    wav = noise(2, 1.0)
    db = LogMel()(wav)
    assert db.shape == (2, 64, 101) and db.dtype == torch.float32
    assert LogMel()(noise(1, 10.0)).shape == (1, 64, 1001)
    torch.testing.assert_close(db, reference_db(wav), rtol=0, atol=1e-4)


def test_state_dict_keys_are_the_release_names():
    keys = set(LogMel().state_dict())
    assert keys == {"0.spectrogram.window", "0.mel_scale.fb"}
    assert set(MelBatchNorm().state_dict()) == {
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
    }
    assert (
        MEL_PARAMS["n_mels"] == 64
        and MEL_PARAMS["hop_length"] == 160
        and MEL_PARAMS["top_db"] == 120
    )


def test_top_db_is_per_clip_not_per_batch():
    loud = noise(1, 1.0, seed=1, scale=30.0)  # peak far above the others
    gappy = noise(1, 1.0, seed=2, scale=0.5)
    gappy[:, 4000:12000] = 0.0  # digital silence: this clip's own clamp triggers
    silent = torch.zeros(1, 16000)
    batch = torch.cat([loud, gappy, silent])
    front = LogMel()
    together = front(batch)
    for i, clip in enumerate(batch):
        torch.testing.assert_close(together[i], front(clip[None])[0], rtol=0, atol=0)
    # each clip is clamped at its own peak − 120 dB
    alone_gappy = front(gappy)[0]
    assert torch.isclose(alone_gappy.min(), alone_gappy.max() - 120)
    assert torch.all(
        together[2] == -100.0
    )  # silence alone: 10·log10(1e-10), not raised by the loud clip
    # the quirk this guards against: torchaudio's clamp over a 3-D batch uses the batch's peak
    batch_db = torchaudio.transforms.AmplitudeToDB(top_db=120)(front[0](batch))
    assert not torch.allclose(batch_db[1], together[1]) and not torch.allclose(
        batch_db[2], together[2]
    )


def test_front_end_ignores_autocast():
    wav = noise(2, 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        db = LogMel()(wav)
    assert db.dtype == torch.float32
    torch.testing.assert_close(db, LogMel()(wav), rtol=0, atol=0)


def test_init_bn_uses_only_valid_frames_in_training():
    bn = MelBatchNorm().train()
    mel = torch.randn(2, 64, 40) * 10 - 30
    garbage = mel.clone()
    garbage[1, :, 20:] = 1e4  # padding frames of item 1
    valid = torch.tensor([40, 20])
    a = bn(mel, valid)
    b = MelBatchNorm().train()(garbage, valid)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1, :, :20], b[1, :, :20])
    # without valid_frames the padding leaks into the batch statistics (the test can fail)
    c = MelBatchNorm().train()(garbage)
    assert not torch.allclose(a[0], c[0])
    # the running statistics moved by momentum 0.01 towards the valid frames' mean
    frames = torch.cat([mel[0], mel[1, :, :20]], dim=1)
    torch.testing.assert_close(bn[1].running_mean, 0.01 * frames.mean(dim=1))
    assert int(bn[1].num_batches_tracked) == 1


def test_init_bn_full_batch_is_plain_batchnorm():
    mel = torch.randn(3, 64, 50)
    bn = MelBatchNorm().train()
    ref = torch.nn.BatchNorm2d(64, momentum=0.01).train()
    out = bn(mel, torch.tensor([50, 50, 50]))
    torch.testing.assert_close(out, ref(mel[:, None].transpose(1, 2)).transpose(1, 2)[:, 0])
