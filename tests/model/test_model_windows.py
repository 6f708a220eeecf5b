"""dasheng_model.windows: the streaming log-mel and the batcher every embedding path uses."""

from __future__ import annotations

import pytest
import torch
from model_testutil import noise

from dasheng_model.embed import embed_mel
from dasheng_model.frontend import LogMel
from dasheng_model.windows import (
    WINDOW_FRAMES,
    WINDOW_SAMPLES,
    StreamingLogMel,
    WindowBatcher,
    embed_mels,
    split_windows,
)


@pytest.mark.parametrize(
    "samples, block",
    [
        (300, 100),  # shorter than one frame's reach: the whole at once
        (WINDOW_SAMPLES, 4096),  # one window and one frame more
        (WINDOW_SAMPLES + 97, 1000),  # a last frame that needs the right reflection
        (3 * WINDOW_SAMPLES + 5000, WINDOW_SAMPLES),
        (2 * WINDOW_SAMPLES + 480, 7),  # a rest of 3 frames: dropped, as split_windows drops it
    ],
)
def test_the_streaming_log_mel_equals_the_whole_files_bit_for_bit(samples, block):
    x = noise(1, samples / 16000, seed=samples)[0]
    x[: samples // 3] *= 1e-6  # a quiet start: the 120 dB floor (from the peak) matters
    logmel = LogMel()
    with torch.no_grad():
        whole = split_windows(logmel(x[None])[0])
    blocks = [x[i : i + block].numpy() for i in range(0, samples, block)]
    streaming = StreamingLogMel(logmel)
    windows = list(streaming.windows(blocks, streaming.peak(blocks)))
    assert [w.shape for w in windows] == [w.shape for w in whole]
    assert all(torch.equal(a, b) for a, b in zip(windows, whole))


def test_a_clip_embeds_the_same_alone_and_in_a_batch_with_longer_clips(tiny):
    """The batcher masks padding: a 2 s clip batched with longer ones gets its own embedding (within
    float rounding when padded, bit for bit when its batch mates have its length). Padding without a
    mask, what the published Hugging Face feature extractors of Dasheng do, changes it."""
    logmel = LogMel()
    short, long1, long2 = (logmel(noise(1, s, seed=int(s)))[0] for s in (2.0, 7.0, 9.5))
    with torch.no_grad():
        alone = embed_mel(tiny, short[None])
    # pool 0: the clips run together, padded to the longest and masked
    batched = embed_mels(tiny, [long1, short, long2], batch_size=3, pool=0)
    frames, clip = batched[1]
    assert frames.shape == alone.frames[0].shape == (50, 192)
    torch.testing.assert_close(frames, alone.frames[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(clip, alone.clip[0], atol=1e-5, rtol=1e-5)
    # no padding (the default pool, or batch mates of its length): the same bits
    assert torch.equal(embed_mels(tiny, [long1, short, long2], batch_size=3)[1][0], alone.frames[0])
    assert torch.equal(
        embed_mels(tiny, [short, short.flip(1)], batch_size=2)[0][0], alone.frames[0]
    )
    # zero padding without a mask: the clip attends to the silence after it
    padded = torch.full((3, 64, long2.shape[1]), float(short.min()))
    for k, m in enumerate((long1, short, long2)):
        padded[k, :, : m.shape[1]] = m
    with torch.no_grad():
        unmasked = embed_mel(tiny, padded).frames[1, :50]
    assert (unmasked - alone.frames[0]).abs().max() > 1e-2


def test_a_long_recording_equals_the_encoder_on_the_whole_of_it(tiny):
    """Full windows batched together, the shorter last one alone: the encoder's own chunking."""
    wav = noise(1, 3.5 * WINDOW_SAMPLES / 16000, seed=3)
    with torch.no_grad():
        whole = tiny(wav)[0]
        mel = LogMel()(wav)[0]
    ((frames, clip),) = embed_mels(tiny, [mel], batch_size=2)
    assert torch.equal(frames, whole) and len(split_windows(mel)) == 4
    torch.testing.assert_close(clip, whole.mean(0), atol=1e-6, rtol=1e-6)


def test_the_batcher_runs_windows_of_one_length_together_and_checks_its_input(tiny):
    batcher = WindowBatcher(tiny, batch_size=2, pool=3)
    mel = torch.full((64, WINDOW_FRAMES), -40.0)
    assert batcher.add("a", mel) == [] and batcher.waiting == 1
    done = batcher.add("b", mel)  # a batch of its length: runs at once
    assert [w.key for w in done] == ["a", "b"] and batcher.batches == 1
    for i, n in enumerate((100, 200, 300)):
        assert batcher.add(i, mel[:, :n]) == []
    done = batcher.add(3, mel[:, :400])  # 4 waiting > pool 3: the longest two, padded
    assert [w.key for w in done] == [3, 2] and [w.frames.shape[0] for w in done] == [100, 75]
    assert [w.key for w in batcher.flush()] == [1, 0] and batcher.waiting == 0
    with pytest.raises(ValueError, match="batch size 0: expected at least 1"):
        WindowBatcher(tiny, batch_size=0)
    with pytest.raises(ValueError, match=r"window 'x': expected a log-mel \(64, 4…1008\)"):
        batcher.add("x", mel[:, :3])
