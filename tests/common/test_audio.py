import os

import numpy as np
import pytest
from helpers import bad_corpus, tone

from dasheng_pipeline.common import audio


def test_ffmpeg_is_resolved_without_the_user(monkeypatch):
    monkeypatch.delenv("DASHENG_FFMPEG", raising=False)
    audio.ffmpeg_exe.cache_clear()
    exe = audio.ffmpeg_exe()
    assert os.access(exe, os.X_OK)
    assert audio.ffmpeg_version() != "unknown"


def test_ffmpeg_override_must_be_executable(monkeypatch, tmp_path):
    audio.ffmpeg_exe.cache_clear()
    monkeypatch.setenv("DASHENG_FFMPEG", str(tmp_path / "nope"))
    try:
        with pytest.raises(FileNotFoundError, match="DASHENG_FFMPEG"):
            audio.ffmpeg_exe()
    finally:
        audio.ffmpeg_exe.cache_clear()


@pytest.mark.parametrize(
    "name, extra", [("a.wav", ()), ("a.flac", ()), ("a.mp3", ()), ("a.m4a", ()), ("a.ogg", ())]
)
def test_decode_resamples_to_16k_mono(tmp_path, name, extra):
    src = tone(tmp_path / name, 2.0, sample_rate=44100, channels=2, freq=1000)
    samples = audio.decode(src)
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert samples.size == 32000
    spectrum = np.abs(np.fft.rfft(samples[4000:20000]))
    assert (
        abs(np.argmax(spectrum) * 16000 / 16000 - 1000) <= 2
    )  # bin width 1 Hz: the tone stays at 1 kHz


def test_segment_decode_is_sample_exact(tmp_path):
    src = tone(tmp_path / "long.m4a", 30.0)
    samples = audio.decode(src, start_s=5.0, duration_s=10.0)
    assert samples.size == 160000


def test_every_bad_input_gets_a_reason(tmp_path):
    expected = bad_corpus(tmp_path)
    rules = audio.ClipRules()
    for rel, want in expected.items():
        samples, reason, _ = audio.load_clip(tmp_path / rel, rules)
        if want == "ok":
            assert samples is not None and reason == "", (rel, reason)
        elif want == "empty file":  # the ingest step catches 0-byte files before decoding
            assert samples is None and reason.startswith("undecodable"), (rel, reason)
        else:
            assert samples is None and reason.startswith(want), (rel, reason)


def test_damaged_file_can_be_kept_when_configured(tmp_path):
    bad_corpus(tmp_path)
    samples, reason, _ = audio.load_clip(
        tmp_path / "bad/truncated.flac", audio.ClipRules(decode_errors="keep")
    )
    assert reason == "" and 0 < samples.size < 3 * 16000


def test_long_files_are_truncated_or_rejected(tmp_path):
    src = tone(tmp_path / "long.wav", 30.0)
    samples, reason, note = audio.load_clip(src, audio.ClipRules(max_duration_s=12))
    assert samples.size == 12 * 16000 and note == "truncated to audio.max_duration_s=12 s"
    samples, reason, _ = audio.load_clip(src, audio.ClipRules(max_duration_s=12, too_long="reject"))
    assert samples is None and reason.startswith("too long: over audio.max_duration_s=12 s")


def test_clip_reader_streams_fixed_blocks(tmp_path):
    src = tone(tmp_path / "t.wav", 25.0)
    reader = audio.ClipReader(src, audio.ClipRules(), 160000)
    sizes = [b.size for b in reader]
    assert sizes == [160000, 160000, 80000] and reader.reason == ""


def test_flac_round_trip_is_16_bit_exact(tmp_path):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(16000) * 0.1).astype(np.float32)
    path = tmp_path / "x.flac"
    audio.encode_flac(x, path)
    y = audio.decode(path)
    assert y.size == x.size
    assert np.abs(y - x).max() <= 1.0 / 32768 + 1e-7
    first = path.read_bytes()
    audio.encode_flac(x, path)
    assert path.read_bytes() == first  # bit-exact: no encoder tags or timestamps


@pytest.mark.parametrize(
    "name", ["concat:evil|x.wav", "-i.wav", "a b;$(touch pwned).wav", "new\nline.wav"]
)
def test_hostile_file_names_are_just_files(tmp_path, name):
    src = tone(tmp_path / "plain.wav", 1.0)
    target = tmp_path / name
    os.rename(src, target)
    samples = audio.decode(target)
    assert samples.size == 16000
    assert not (tmp_path / "pwned").exists()


def test_local_protocols_only_for_files(tmp_path):
    # A playlist that points at the network must not be followed when read as a local file.
    playlist = tmp_path / "list.m3u8"
    playlist.write_text("#EXTM3U\n#EXTINF:10,\nhttp://127.0.0.1:9/never.wav\n")
    samples, reason, _ = audio.load_clip(playlist, audio.ClipRules())
    assert samples is None and "undecodable" in reason
