"""MAE: group masking, the loss, padding, training on one batch."""

from __future__ import annotations

import pytest
import torch
from model_testutil import noise

from dasheng_model.frontend import LogMel
from dasheng_model.mae import DECODERS, MaskedAutoencoder, group_masking, masked_mse, patchify


def masking(valid, n, seed=0, ratio=0.75):
    return group_masking(torch.as_tensor(valid), n, ratio, torch.Generator().manual_seed(seed))


def visible_of(m):
    return torch.zeros_like(m.real).scatter(1, m.keep, m.keep_real)


def test_exactly_75_percent_masked_in_pairs():
    m = masking([200, 200, 200], 200)
    assert m.masked.shape == (3, 200)
    assert (m.masked.sum(dim=1) == 150).all()  # exactly 75 %
    vis = visible_of(m)
    assert (vis.sum(dim=1) == 50).all() and not (vis & m.masked).any()
    pairs = m.masked.view(3, 100, 2)
    assert (pairs[..., 0] == pairs[..., 1]).all()  # adjacent tokens masked together
    assert m.keep.shape == (3, 50)
    assert (m.keep.view(3, 25, 2)[..., 1] == m.keep.view(3, 25, 2)[..., 0] + 1).all()
    assert not torch.equal(m.masked[0], m.masked[1])  # each item its own mask


def test_masking_is_reproducible_with_a_seed():
    a, b, c = (
        masking([250] * 4, 250, seed=1),
        masking([250] * 4, 250, seed=1),
        masking([250] * 4, 250, seed=2),
    )
    assert torch.equal(a.masked, b.masked) and torch.equal(a.keep, b.keep)
    assert not torch.equal(a.masked, c.masked)
    assert (
        a.masked.sum(dim=1) == 250 - 62
    ).all()  # 125 pairs, 31 kept: 62 visible as in the release


def test_restore_puts_kept_tokens_first():
    m = masking([250, 120], 250)
    assert sorted(m.restore[0].tolist()) == list(range(250))  # a permutation
    positions = m.restore.gather(1, m.keep)  # where each kept token sits in [kept..., dropped...]
    assert torch.equal(positions, torch.arange(m.keep.shape[1]).expand(2, -1))


def test_padding_is_never_visible_nor_in_the_loss():
    m = masking([250, 41, 8, 1], 250, seed=3)
    vis = visible_of(m)
    real = torch.arange(250) < torch.tensor([250, 41, 8, 1])[:, None]
    assert not (vis & ~real).any() and not (m.masked & ~real).any()
    assert (vis | m.masked).eq(real).all()
    # per item: floor(pairs / 4) pairs kept (at least one), odd counts end in a half pair
    assert vis.sum(dim=1).tolist() == [62, 10, 2, 1]


def test_loss_ignores_visible_tokens():
    pred, target = torch.randn(2, 20, 256), torch.randn(2, 20, 256) * 10 - 40
    masked = torch.zeros(2, 20, dtype=torch.bool)
    masked[:, ::3] = True
    loss = masked_mse(pred, target, masked)
    changed = target.clone()
    changed[0, 1] += torch.randn(256) * 100  # token 1 is visible
    assert masked_mse(pred, changed, masked) == loss
    changed[0, 3] += torch.randn(256) * 100  # token 3 is masked
    assert masked_mse(pred, changed, masked) != loss
    # per-token normalised target: (x - mean) / sqrt(var + 1e-6)
    t = target[:, ::3]
    ref = (
        (pred[:, ::3] - (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt())
        ** 2
    ).mean()
    torch.testing.assert_close(loss, ref)


def test_patchify_orders_values_as_unfold():
    mel = torch.randn(2, 64, 1001)
    ref = torch.nn.functional.unfold(mel[:, None], kernel_size=(64, 4), stride=(64, 4)).transpose(
        1, 2
    )
    assert torch.equal(patchify(mel), ref)
    assert patchify(mel).shape == (2, 250, 256)


@pytest.fixture(scope="module")
def tiny_mae():
    torch.manual_seed(0)
    return MaskedAutoencoder("tiny")


def test_mae_forward_shapes_and_targets(tiny_mae):
    mel = LogMel()(noise(2, 10.0))
    out = tiny_mae(mel, generator=torch.Generator().manual_seed(0))
    assert out.pred.shape == out.target.shape == (2, 250, 256)
    assert torch.equal(out.target, patchify(mel))  # dB log-mel before init_bn
    assert out.masked.sum().item() == 2 * (250 - 62)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert (
        tiny_mae.encoder.time_pos_embed.grad is not None
        and tiny_mae.decoder.mask_token.grad is not None
    )
    tiny_mae.zero_grad()


def test_mae_loss_ignores_padding_content(tiny_mae):
    mel = LogMel()(noise(2, 10.0, seed=4))
    valid = torch.tensor([1001, 403])
    other = mel.clone()
    other[1, :, 403:] = torch.randn(64, 598) * 40
    a = tiny_mae(mel, valid, torch.Generator().manual_seed(5))
    b = tiny_mae(other, valid, torch.Generator().manual_seed(5))
    torch.testing.assert_close(a.loss, b.loss, atol=1e-6, rtol=1e-6)
    assert not a.masked[1, 100:].any()
    # the same change counts when those frames are declared real
    c = tiny_mae(other, generator=torch.Generator().manual_seed(5))
    assert abs(c.loss.item() - a.loss.item()) > 1e-3


def test_mae_odd_token_count_and_float16_input(tiny_mae):
    mel = LogMel()(noise(3, 1.0)).half()  # 101 frames → 25 tokens
    out = tiny_mae(mel, torch.tensor([101, 60, 4]), torch.Generator().manual_seed(0))
    assert out.pred.shape == (3, 25, 256)
    # 25 real tokens = 13 pairs → 3 kept (5 or 6 tokens: the last pair is half padding); 15 → 8 pairs
    # → 2 kept (3 or 4 tokens); 1 token → its pair is kept, nothing left to mask
    masked = out.masked.sum(dim=1).tolist()
    assert masked[0] in (19, 20) and masked[1] in (11, 12) and masked[2] == 0
    assert torch.isfinite(out.loss)


def test_mae_refuses_crops_longer_than_10_08_s(tiny_mae):
    with pytest.raises(ValueError, match="at most 1008 frames"):
        tiny_mae(torch.zeros(1, 64, 1012))
    with pytest.raises(ValueError, match="mask_ratio"):
        MaskedAutoencoder("tiny", mask_ratio=1.0)


def test_mae_bf16_autocast_step():
    torch.manual_seed(0)
    mae = MaskedAutoencoder("tiny")
    mel = LogMel()(noise(2, 4.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mae(mel, torch.tensor([401, 250]), torch.Generator().manual_seed(0))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in mae.parameters() if p.grad is not None)


def test_decoder_sizes():
    def count(module):
        return sum(p.numel() for p in module.parameters())

    with torch.device("meta"):
        base, big = MaskedAutoencoder("base"), MaskedAutoencoder("1.2B")
    assert DECODERS["dec-25m"].embed_dim == 512 and DECODERS["dec-56m"].num_heads == 24
    assert 25e6 < count(base.decoder) < 26e6  # Dec-25M
    assert 56e6 < count(big.decoder) < 59e6  # Dec-56M (its 8 blocks alone: 56.7 M)


def test_tiny_mae_overfits_one_batch():
    torch.manual_seed(0)
    mae = MaskedAutoencoder("tiny").train()
    t = torch.arange(16000) / 16000
    wav = torch.stack([0.3 * torch.sin(2 * torch.pi * f * t * (1 + t)) for f in (220.0, 880.0)])
    wav = wav + noise(2, 1.0, seed=1, scale=0.02)
    mel = LogMel()(wav)
    opt = torch.optim.AdamW(mae.parameters(), lr=1e-3)
    losses = []
    for _ in range(200):
        out = mae(mel, generator=torch.Generator().manual_seed(0))  # the same masks each step
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])
    assert losses[-1] < 0.1  # also 10x below 1.0, the loss of predicting each token's mean
