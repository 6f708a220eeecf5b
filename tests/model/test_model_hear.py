"""embed() and the HEAR module API, with the HEAR validator's own checks."""

from __future__ import annotations

import copy

import pytest
import torch
from model_testutil import noise

from dasheng_model import hear
from dasheng_model.checkpoint import save_checkpoint
from dasheng_model.embed import embed, embed_layers, embed_mel, frame_times_ms
from dasheng_model.frontend import LogMel


def test_embed_frames_and_clip_mean(tiny):
    wav = noise(3, 11.0)
    out = embed(tiny, wav)
    assert out.frames.shape == (3, 275, 192) and out.clip.shape == (3, 192)
    assert out.num_frames.tolist() == [275] * 3
    torch.testing.assert_close(out.clip, out.frames.mean(dim=1))
    assert not out.frames.requires_grad and not tiny.training


def test_clip_embedding_excludes_padding(tiny):
    wav = noise(2, 4.0, seed=1)
    lengths = torch.tensor([64000, 32000])
    out = embed(tiny, wav, lengths=lengths)
    assert out.num_frames.tolist() == [100, 50]
    assert torch.all(out.frames[1, 50:] == 0)
    torch.testing.assert_close(out.clip[1], out.frames[1, :50].mean(dim=0))
    # equal to the item cut to its length, up to the last frames' view of the padding
    alone = embed(
        tiny, wav[1:, : 32000 + 256]
    )  # the frames of 50 tokens see 96 samples past the cut
    torch.testing.assert_close(out.frames[1, :50], alone.frames[0, :50], atol=1e-5, rtol=1e-5)
    mel = embed_mel(tiny, LogMel()(wav), valid_frames=torch.tensor([401, 201]))
    assert mel.num_frames.tolist() == [100, 50]
    torch.testing.assert_close(mel.clip, out.clip, atol=1e-5, rtol=1e-5)


def test_bf16_embeddings_agree_with_fp32(tiny):
    wav, lengths = noise(3, 12.0, seed=5), torch.tensor([192000, 100000, 64000])
    fp32 = embed(tiny, wav, lengths=lengths)
    bf16 = embed(tiny, wav, lengths=lengths, dtype="bf16")
    assert bf16.frames.dtype == bf16.clip.dtype == torch.float32
    assert not torch.equal(bf16.frames, fp32.frames)  # autocast really ran
    assert bf16.num_frames.tolist() == fp32.num_frames.tolist() and torch.all(
        bf16.frames[2, 100:] == 0
    )
    frames = torch.nn.functional.cosine_similarity(bf16.frames[0], fp32.frames[0], dim=-1)
    assert frames.min() > 0.995
    assert torch.nn.functional.cosine_similarity(bf16.clip, fp32.clip, dim=-1).min() > 0.9999
    # the other spellings, and the log-mel entry point
    assert torch.equal(embed(tiny, wav, lengths=lengths, dtype=torch.bfloat16).frames, bf16.frames)
    torch.testing.assert_close(
        embed(tiny, wav, lengths=lengths, dtype=torch.float32).frames, fp32.frames, atol=0, rtol=0
    )
    mel = embed_mel(tiny, LogMel()(wav), valid_frames=lengths // 160 // 4 * 4, dtype="bf16")
    torch.testing.assert_close(mel.clip, bf16.clip, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="unsupported dtype 'fp16': expected 'fp32' or 'bf16'"):
        embed(tiny, wav, dtype="fp16")


def test_bf16_weight_cache_equals_plain_autocast_and_follows_the_weights(tiny):
    encoder = copy.deepcopy(tiny)
    wav = noise(2, 3.0, seed=6)

    def plain():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return encoder(wav)

    assert torch.equal(embed(encoder, wav, dtype="bf16").frames, plain())
    with torch.no_grad():
        encoder.blocks[1].mlp.fc1.weight.mul_(1.5)  # an in-place update: the cached cast is stale
    assert torch.equal(embed(encoder, wav, dtype="bf16").frames, plain())
    encoder.load_state_dict(tiny.state_dict())
    assert torch.equal(
        embed(encoder, wav, dtype="bf16").frames, embed(tiny, wav, dtype="bf16").frames
    )


def test_embed_restores_training_mode(tiny):
    tiny.train()
    try:
        embed(tiny, noise(1, 1.0))
        assert tiny.training
    finally:
        tiny.eval()


def test_wrong_sample_rate_is_refused(tiny):
    with pytest.raises(ValueError, match="expected audio at 16000 Hz, got 44100 Hz"):
        embed(tiny, noise(1, 1.0), sample_rate=44100)


def test_frame_times():
    t = frame_times_ms(4)
    assert t.tolist() == [15.0, 55.0, 95.0, 135.0]


@pytest.fixture(scope="module")
def hear_model():
    return hear.load_model("random:tiny", device="cpu")


def test_model_attributes(hear_model):
    assert hear_model.sample_rate == 16000
    assert hear_model.scene_embedding_size == hear_model.timestamp_embedding_size == 192
    assert isinstance(hear_model, torch.nn.Module)


@pytest.mark.parametrize("seconds", [1.07, 1.98, 4.0])
def test_validator_timestamp_checks(hear_model, seconds):
    audio = (
        torch.rand(3, int(seconds * 16000)) * 2 - 1
    )  # white noise in [-1, 1], as the validator's
    emb, ts = hear.get_timestamp_embeddings(audio, hear_model)
    assert emb.dtype == torch.float32 and ts.dtype == torch.float32
    assert (
        emb.ndim == 3 and emb.shape[0] == 3 and emb.shape[2] == hear_model.timestamp_embedding_size
    )
    assert ts.shape == emb.shape[:2]
    hops = torch.diff(ts, dim=1)
    assert torch.all((hops - hops.mean()).abs() <= 1.0)  # regular within 1 ms
    assert hops.mean() <= 50  # the validator warns above 50 ms
    assert torch.all(ts[:, -1] <= seconds * 1000)  # last timestamp within the audio
    assert ts[0, 0] >= 0
    assert emb.shape[1] == (int(seconds * 16000) // 160 + 1) // 4


def test_validator_scene_checks(hear_model):
    audio = torch.rand(4, int(2.74 * 16000)) * 2 - 1
    scene = hear.get_scene_embeddings(audio, hear_model)
    assert scene.shape == (4, hear_model.scene_embedding_size) and scene.dtype == torch.float32
    emb, _ = hear.get_timestamp_embeddings(audio, hear_model)
    torch.testing.assert_close(scene, emb.mean(dim=1))
    assert not torch.allclose(scene[0], scene[1])


def test_batches_larger_than_the_model_batch(hear_model):
    audio = noise(5, 1.0)
    small = hear.HearModel(hear_model.encoder, batch_size=2)
    torch.testing.assert_close(
        hear.get_scene_embeddings(audio, small), hear.get_scene_embeddings(audio, hear_model)
    )


def test_load_model_paths(tmp_path, tiny):
    path = save_checkpoint(tiny, tmp_path / "tiny.safetensors")
    model = hear.load_model(str(path), device="cpu")
    assert torch.equal(model.encoder.blocks[0].attn.qkv.weight, tiny.blocks[0].attn.qkv.weight)
    torch.save({"model": tiny.state_dict(), "config": {"num_heads": 3}}, tmp_path / "official.pt")
    model = hear.load_model(str(tmp_path / "official.pt"), device="cpu")
    audio = noise(2, 1.5)
    torch.testing.assert_close(hear.get_scene_embeddings(audio, model), embed(tiny, audio).clip)
    # random weights: the same every time for a size
    a, b = (
        hear.load_model("random:tiny", device="cpu"),
        hear.load_model("random:tiny", device="cpu"),
    )
    assert torch.equal(a.encoder.patch_embed.proj.weight, b.encoder.patch_embed.proj.weight)
    with pytest.raises(ValueError, match="unknown size"):
        hear.load_model("random:huge")


def test_load_model_bf16(tiny):
    model = hear.load_model("random:tiny", device="cpu", dtype="bf16")
    audio = noise(2, 1.5)
    scene = hear.get_scene_embeddings(audio, model)
    assert model.dtype == "bf16" and scene.dtype == torch.float32
    torch.testing.assert_close(
        scene, embed(model.encoder, audio, dtype="bf16").clip, atol=0, rtol=0
    )
    assert not torch.equal(scene, embed(model.encoder, audio).clip)
    with pytest.raises(ValueError, match="unsupported dtype"):
        hear.load_model("random:tiny", device="cpu", dtype="int8")


@pytest.mark.parametrize(
    "audio, message",
    [
        (torch.zeros(16000), "Tensor[n_sounds, n_samples]"),
        (torch.zeros(2, 2, 16000), "Tensor[n_sounds, n_samples]"),
        (torch.zeros(0, 16000), "at least one sound"),
        (torch.zeros(2, 100), "at least 640 samples"),
        (torch.full((2, 16000), float("nan")), "NaN"),
    ],
)
def test_hear_bad_audio(hear_model, audio, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        hear.get_scene_embeddings(audio, hear_model)


def test_layers_are_the_outputs_of_a_truncated_encoder(tiny, tmp_path):
    """Block k's embeddings equal those of the encoder cut after block k (11 s: two chunks);
    block depth is the last layer; mean is the mean of the blocks; the HEAR module passes it on."""
    import copy

    wav = noise(2, 11.0, seed=3)
    lengths = torch.tensor([176000, 100000])
    mel = LogMel()(wav)
    valid = lengths // 160 + 1
    layers = embed_layers(tiny, mel, valid)
    assert len(layers) == 6
    for k in (1, 3):
        cut = copy.deepcopy(tiny)
        cut.blocks = cut.blocks[:k]
        want = embed(cut, wav, lengths=lengths)
        got = embed(tiny, wav, lengths=lengths, layer=k)
        torch.testing.assert_close(got.frames, want.frames)
        torch.testing.assert_close(layers[k - 1].clip, want.clip, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layers[-1].frames, embed_mel(tiny, mel, valid).frames)
    torch.testing.assert_close(embed(tiny, wav, layer=6).frames, embed(tiny, wav).frames)
    mean = embed(tiny, wav, lengths=lengths, layer="mean")
    torch.testing.assert_close(
        mean.frames,
        torch.stack([embed(tiny, wav, lengths=lengths, layer=k).frames for k in range(1, 7)]).mean(
            0
        ),
        atol=1e-6,
        rtol=1e-5,
    )
    path = save_checkpoint(tiny, tmp_path / "tiny.safetensors")
    model = hear.load_model(str(path), device="cpu", layer="2")
    torch.testing.assert_close(
        hear.get_scene_embeddings(wav[:, :32000], model),
        embed(tiny, wav[:, :32000], layer=2).clip,
        atol=1e-5,
        rtol=1e-5,
    )
    for bad in (0, 7, "first", True):
        with pytest.raises(ValueError, match=r"expected 'last', 'mean' or a block number 1\.\.6"):
            embed(tiny, wav, layer=bad)
