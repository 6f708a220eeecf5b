"""Encoder: shapes, sizes, chunking, batch independence, padding, entry points, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from model_testutil import explicit_attention, noise

from dasheng_model import encoder as encoder_module
from dasheng_model.encoder import (
    MAX_TOKENS,
    SIZES,
    DashengEncoder,
    count_parameters,
    key_padding_mask,
)
from dasheng_model.frontend import LogMel
from dasheng_model.pretrained import random_encoder


def run(encoder, *args, **kwargs):
    with torch.no_grad():
        return encoder(*args, **kwargs)


def run_mel(encoder, *args, **kwargs):
    with torch.no_grad():
        return encoder.forward_mel(*args, **kwargs)


@pytest.mark.parametrize("seconds, frames", [(1.0, 25), (11.0, 275), (10.0, 250), (0.04, 1)])
def test_frames_at_25_hz(tiny, seconds, frames):
    out = run(tiny, noise(2, seconds))
    assert out.shape == (2, frames, 192)
    assert torch.isfinite(out).all()


def test_parameter_counts_match_the_release():
    # base/0.6B/1.2B counted on the meta device (nothing allocated); the release's counts are
    # 85.4 M / 630 M / 1.13 B (the oracle test checks base and tiny against dasheng itself)
    assert count_parameters("base") == 85_447_808
    assert count_parameters("0.6B") == 630_333_568
    assert count_parameters("1.2B") == 1_134_047_360
    assert count_parameters("tiny") == 2_767_616
    assert (
        SIZES["0.6B"].embed_dim == 1280
        and SIZES["1.2B"].num_heads == 24
        and SIZES["base"].depth == 12
    )


def test_release_key_names(tiny):
    keys = set(tiny.state_dict())
    for key in [
        "front_end.0.spectrogram.window",
        "front_end.0.mel_scale.fb",
        "init_bn.1.running_var",
        "init_bn.1.num_batches_tracked",
        "patch_embed.proj.weight",
        "time_pos_embed",
        "freq_pos_embed",
        "blocks.5.attn.qkv.bias",
        "blocks.5.attn.proj.weight",
        "blocks.0.mlp.fc2.weight",
        "norm.bias",
    ]:
        assert key in keys
    assert tiny.time_pos_embed.shape == (1, 192, 1, 252) and tiny.freq_pos_embed.shape == (
        1,
        192,
        1,
        1,
    )
    assert len(keys) == 2 + 5 + 2 + 2 + 12 * 6 + 2


def test_sdpa_attention_equals_explicit_softmax(tiny):
    attn = tiny.blocks[0].attn
    x = torch.randn(3, 30, 192)
    valid = torch.arange(30) < torch.tensor([30, 17, 5])[:, None]
    with torch.no_grad():
        torch.testing.assert_close(attn(x), explicit_attention(attn, x), atol=1e-5, rtol=1e-5)
        mask = key_padding_mask(valid)
        torch.testing.assert_close(
            attn(x, mask), explicit_attention(attn, x, mask), atol=1e-5, rtol=1e-5
        )


def test_long_input_equals_each_chunk_alone(tiny):
    wav = noise(2, 25.0, seed=3)  # 625 tokens: chunks of 252, 252, 121
    mel = LogMel()(wav)
    whole = run_mel(tiny, mel)
    assert whole.shape == (2, 625, 192)
    for start in (0, MAX_TOKENS, 2 * MAX_TOKENS):
        stop = min(start + MAX_TOKENS, 625)
        alone = run_mel(tiny, mel[..., 4 * start : 4 * stop])  # positions restart at 0
        torch.testing.assert_close(whole[:, start:stop], alone, atol=1e-5, rtol=1e-5)
    # the chunks really are independent: a chunk alone differs from the same span inside a longer chunk
    assert not torch.allclose(
        whole[:, 252:300], run_mel(tiny, mel[..., : 4 * 300])[:, 252:300], atol=1e-3
    )


def test_an_item_does_not_depend_on_its_batch_mates(tiny):
    a = noise(1, 23.0, seed=4)
    mates = torch.cat(
        [noise(1, 23.0, seed=5, scale=3.0), torch.zeros(1, 368000), noise(1, 23.0, seed=6)]
    )
    alone = run(tiny, a)
    for position in range(4):
        batch = torch.cat([mates[:position], a, mates[position:]])
        torch.testing.assert_close(run(tiny, batch)[position], alone[0], atol=1e-5, rtol=1e-5)
        lengths = torch.tensor([368000, 200000, 368000, 1000])
        lengths[position] = 368000
        torch.testing.assert_close(
            run(tiny, batch, lengths)[position], alone[0], atol=1e-5, rtol=1e-5
        )


def test_padded_item_equals_the_unpadded_one(tiny):
    mel = LogMel()(noise(1, 3.0, seed=7))  # 301 frames → 75 tokens
    alone = run_mel(tiny, mel)
    padded = torch.cat([mel, torch.randn(1, 64, 700) * 50], dim=-1)  # garbage padding, 1001 frames
    batch = torch.cat([padded, LogMel()(noise(1, 10.0, seed=8))])
    out = run_mel(tiny, batch, torch.tensor([301, 1001]))
    torch.testing.assert_close(out[0, :75], alone[0], atol=1e-5, rtol=1e-5)
    # without the mask the padding changes the real frames (so the mask is what makes them equal)
    assert not torch.allclose(run_mel(tiny, batch)[0, :75], alone[0], atol=1e-3)


def test_padded_item_across_chunks(tiny):
    mel = LogMel()(noise(1, 12.0, seed=9))  # 300 tokens: a full chunk and 48 more
    alone = run_mel(tiny, mel)
    padded = torch.cat(
        [mel, torch.randn(1, 64, 1600) * 50], dim=-1
    )  # 700 tokens, two chunks only padding
    out = run_mel(tiny, padded, torch.tensor([1201]))
    assert torch.isfinite(out).all()  # chunks made only of padding stay finite
    torch.testing.assert_close(out[0, :300], alone[0], atol=1e-5, rtol=1e-5)


def test_waveform_padding_content_does_not_leak(tiny):
    wav = noise(1, 4.0, seed=10)
    L = 2 * 16000  # 50 real tokens; their frames read samples up to 50·640 + 96
    a, b = wav.clone(), wav.clone()
    b[:, L + 256 :] = noise(1, 4.0, seed=11)[:, L + 256 :]
    out_a, out_b = run(tiny, a, torch.tensor([L])), run(tiny, b, torch.tensor([L]))
    torch.testing.assert_close(out_a[:, :50], out_b[:, :50], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(run(tiny, a)[:, :50], run(tiny, b)[:, :50], atol=1e-3)


def test_waveform_and_spectrogram_entry_points_agree(tiny):
    wav = noise(3, 11.0, seed=12)
    mel = LogMel()(wav)
    torch.testing.assert_close(run(tiny, wav), run_mel(tiny, mel), atol=0, rtol=0)
    lengths = torch.tensor([176000, 64000, 96000])  # multiples of 640: length // 640 == frames // 4
    frames = lengths // 160 + 1
    a, b = run(tiny, wav, lengths), run_mel(tiny, mel, frames)
    for i, n in enumerate((lengths // 640).tolist()):
        torch.testing.assert_close(a[i, :n], b[i, :n], atol=0, rtol=0)
    # float16, as the data stage stores the mel: the same within float16's rounding of dB values
    half = run_mel(tiny, mel.half())
    assert (half - run_mel(tiny, mel)).abs().max() < 0.05


def test_bf16_autocast_runs(tiny):
    wav = noise(2, 3.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(tiny, wav, torch.tensor([48000, 20000]))
    assert out.shape == (2, 75, 192) and torch.isfinite(out).all()
    assert (out.float() - run(tiny, wav, torch.tensor([48000, 20000]))).abs().mean() < 0.1


@pytest.mark.parametrize(
    "audio, lengths, message",
    [
        (torch.zeros(2, 2, 16000), None, "mono"),
        (torch.zeros(0, 16000), None, "empty"),
        (torch.zeros(2, 0), None, "empty"),
        (torch.zeros(2, 639), None, "at least 640 samples"),
        (torch.zeros(16000, 2), None, "(samples, channels)"),
        (torch.full((1, 16000), float("nan")), None, "NaN"),
        (torch.tensor([[0.0] * 8000 + [float("inf")] * 8000]), None, "NaN or infinite"),
        (torch.zeros(1, 16000, dtype=torch.int16), None, "float audio"),
        (torch.zeros(2, 16000), torch.tensor([16000]), "shape (2,)"),
        (torch.zeros(2, 16000), torch.tensor([16000, 100]), "[640, 16000]"),
        (torch.zeros(2, 16000), torch.tensor([16000.0, 9000.0]), "integers"),
        ("not a tensor", None, "torch.Tensor"),
    ],
)
def test_bad_waveforms_are_refused(tiny, audio, lengths, message):
    with pytest.raises(ValueError) as err:
        run(tiny, audio, lengths)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "mel, valid, message",
    [
        (torch.zeros(2, 128, 100), None, "(batch, 64, frames)"),
        (torch.zeros(64, 100), None, "(batch, 64, frames)"),
        (torch.zeros(2, 64, 3), None, "at least 4"),
        (torch.zeros(0, 64, 100), None, "empty"),
        (torch.full((1, 64, 100), float("nan")), None, "NaN"),
        (torch.zeros(1, 64, 100, dtype=torch.long), None, "floating-point"),
        (torch.zeros(1, 64, 100), torch.tensor([101]), "[4, 100]"),
    ],
)
def test_bad_mels_are_refused(tiny, mel, valid, message):
    with pytest.raises(ValueError) as err:
        run_mel(tiny, mel, valid)
    assert message in str(err.value)


def test_unknown_size_is_refused():
    with pytest.raises(ValueError, match="unknown model size 'huge'"):
        DashengEncoder("huge")


def test_shard_window_with_valid_frames_equals_the_clip_alone(tiny):
    # the data stage's partial window: mel of the real samples, padded to 1001 frames with its
    # minimum, valid_frames = samples // 160 + 1 (here 4.8 s: 481 frames → 120 tokens)
    clip = noise(1, 4.8, seed=13)
    mel = LogMel()(clip)
    assert mel.shape[-1] == 481
    window = torch.cat([mel, mel.min().expand(1, 64, 1001 - 481)], dim=-1).half()
    out = run_mel(tiny, window, torch.tensor([481]))
    alone = run(tiny, clip)
    assert alone.shape[1] == 120
    torch.testing.assert_close(
        out[:, :120], alone, atol=0.05, rtol=0
    )  # float16 storage of dB values
    exact = run_mel(tiny, window.float(), torch.tensor([481]))
    torch.testing.assert_close(
        exact[:, :120], run_mel(tiny, mel.half().float()), atol=1e-5, rtol=1e-5
    )


@pytest.mark.skipif(not encoder_module._ONEDNN, reason="this torch build has no oneDNN linear ops")
def test_onednn_inference_path_equals_the_plain_path(tiny, monkeypatch):
    enc = copy.deepcopy(tiny)
    wav, lengths = noise(2, 3.0, seed=7), torch.tensor([48000, 20000])
    fast = run(enc, wav, lengths)
    assert torch.float32 in enc.blocks[0].mlp.fc1._packed  # the path ran
    monkeypatch.setattr(encoder_module, "ONEDNN_INFERENCE", False)
    plain = run(enc, wav, lengths)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    assert not torch.equal(fast, plain)  # a different summation order: it really is another kernel
    monkeypatch.setattr(encoder_module, "ONEDNN_INFERENCE", True)
    with torch.no_grad():
        enc.blocks[0].mlp.fc1.weight.mul_(2.0)  # an in-place update: the packed weight is stale
    changed = run(enc, wav, lengths)
    monkeypatch.setattr(encoder_module, "ONEDNN_INFERENCE", False)
    changed_plain = run(enc, wav, lengths)
    torch.testing.assert_close(changed, changed_plain, atol=1e-5, rtol=1e-5)
    # with gradients (training) the plain path runs, whatever the flag
    monkeypatch.setattr(encoder_module, "ONEDNN_INFERENCE", True)
    assert torch.equal(enc(wav, lengths).detach(), changed_plain)


def test_weights_changed_in_place_during_training_are_seen_by_the_next_eval():
    """An optimiser that writes through raw pointers (bitsandbytes' 8-bit AdamW) bumps no version
    counter: leaving train mode must drop the CPU inference path's packed weights."""
    import copy

    from dasheng_model.pretrained import random_encoder

    encoder = random_encoder("tiny", 1)
    mel = torch.randn(2, 64, 200)
    with torch.no_grad():
        encoder.forward_mel(mel)  # packs the weights
        encoder.train()
        for p in encoder.parameters():
            p.data.mul_(0.9)  # in place, no version bump on p
        encoder.eval()
        after = encoder.forward_mel(mel)
        fresh = copy.deepcopy(encoder).forward_mel(mel)
    assert torch.equal(after, fresh)


def test_an_encoder_built_under_inference_mode_runs():
    # inference tensors carry no version counter: the packed-weight cache must not ask for one
    wav = noise(1, 1.0, seed=3)
    with torch.inference_mode():
        enc = random_encoder("tiny").eval()
        frames = enc(wav)
    with torch.no_grad():
        reference = random_encoder("tiny").eval()(wav)
    torch.testing.assert_close(frames, reference, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_released_plain_weights_give_the_same_embeddings_and_refuse_training(dtype):
    from dasheng_model.embed import embed
    from dasheng_model.encoder import release_plain_weights

    if not encoder_module._ONEDNN:
        pytest.skip("this torch build has no oneDNN linear ops: nothing is packed or released")
    wav = noise(2, 3.0, seed=5)
    enc = random_encoder("tiny").eval()
    before = embed(enc, wav, dtype=dtype).frames
    weights = sum(m.weight.nbytes for m in enc.modules() if isinstance(m, encoder_module.Linear))
    assert release_plain_weights(enc, dtype) == weights > 0
    assert all(m.weight.numel() == 0 for m in enc.modules() if isinstance(m, encoder_module.Linear))
    torch.testing.assert_close(embed(enc, wav, dtype=dtype).frames, before, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="packed CPU inference weights"):
        enc(wav)  # with gradients: the plain path, whose weights are gone
    with pytest.raises(RuntimeError, match="packed CPU inference weights"):
        enc.train()
