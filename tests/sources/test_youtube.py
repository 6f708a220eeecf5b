"""Real yt-dlp downloads from a loopback HTTP server (no internet)."""

import json

import numpy as np
import pytest
from helpers import tone
from loopback import File, Flaky, Reset, Stall, Status

from dasheng_pipeline.common import audio
from dasheng_pipeline.sources import lists, youtube

pytestmark = pytest.mark.network

RULES = audio.ClipRules()


def options(server, **overrides):
    base = dict(
        url_template=server.url_template,
        retries=2,
        backoff_s=0.5,
        max_backoff_s=30.0,
        socket_timeout_s=2.0,
        attempt_timeout_s=20.0,
        rate_limit=None,
        sleep_between_s=0.0,
        cookies=None,
        segment_download=True,
    )
    return youtube.FetchOptions(**{**base, **overrides})


def segment(ytid, start=5.0, end=15.0, row=0):
    return lists.Segment(
        row=row, line=row + 1, ytid=ytid, start_s=start, end_s=end, labels=["/m/x"]
    )


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    return {
        "wav": tone(root / "a.wav", 30.0, channels=2, freq=500),
        "m4a": tone(root / "a.m4a", 30.0, freq=500),
        "mp4": tone(root / "a.mp4", 30.0, freq=500),
    }


@pytest.mark.parametrize(
    "kind, ctype", [("wav", "audio/x-wav"), ("m4a", "audio/mp4"), ("mp4", "video/mp4")]
)
@pytest.mark.parametrize("segment_download", [True, False])
def test_segment_download_to_16k_flac(tmp_path, loopback, media, kind, ctype, segment_download):
    vid = f"{kind}AAAAAAAA"[:11]
    loopback.routes[vid] = File(media[kind], ctype)
    sleeps = []
    row = youtube.fetch_clip(
        segment(vid),
        tmp_path,
        options(loopback, segment_download=segment_download),
        True,
        RULES,
        sleep=sleeps.append,
    )
    assert row["status"] == "ok", row
    assert row["attempts"] == 1 and sleeps == []
    assert row["note"] == (
        "segment downloaded" if segment_download else "whole file downloaded, segment cut locally"
    )
    samples = audio.decode(row["audio"])
    assert samples.size == 160000  # exactly the 10 s segment, at 16 kHz mono
    spectrum = np.abs(np.fft.rfft(samples))
    assert abs(np.argmax(spectrum) * 16000 / samples.size - 500) < 2


def test_permanent_errors_are_not_retried(tmp_path, loopback):
    loopback.routes["gone0000000"] = Status(404)
    sleeps = []
    row = youtube.fetch_clip(
        segment("gone0000000"), tmp_path, options(loopback), True, RULES, sleep=sleeps.append
    )
    assert row["status"] == "failed" and row["attempts"] == 1
    assert row["reason"] == "HTTP 404 Not Found (permanent; 1 attempt(s))"
    assert sleeps == [] and loopback.hits["gone0000000"] == 1


def test_stalled_server_times_out_then_retries_with_backoff(tmp_path, loopback):
    loopback.routes["stall000000"] = Stall(30)
    sleeps = []
    row = youtube.fetch_clip(
        segment("stall000000"),
        tmp_path,
        options(loopback, retries=1, socket_timeout_s=1.0),
        True,
        RULES,
        sleep=sleeps.append,
    )
    assert row["status"] == "failed" and row["attempts"] == 2
    assert "(transient; 2 attempt(s))" in row["reason"]
    assert sleeps == [0.5]


def test_hard_attempt_timeout_kills_a_trickling_download(tmp_path, loopback, media):
    from loopback import Trickle

    loopback.routes["slow0000000"] = Trickle(media["wav"], 20000)
    row = youtube.fetch_clip(
        segment("slow0000000"),
        tmp_path,
        options(loopback, retries=0, attempt_timeout_s=2.0, segment_download=False),
        True,
        RULES,
        sleep=lambda s: None,
    )
    assert row["status"] == "failed" and row["reason"].startswith(
        "timed out: no complete download within 2 s"
    )


def test_retry_after_is_honoured_and_flaky_server_recovers(tmp_path, loopback, media):
    loopback.routes["flaky000000"] = Flaky(
        2, File(media["wav"]), code=429, headers={"Retry-After": "3"}
    )
    sleeps = []
    row = youtube.fetch_clip(
        segment("flaky000000"), tmp_path, options(loopback), True, RULES, sleep=sleeps.append
    )
    assert row["status"] == "ok" and row["attempts"] == 3
    assert sleeps == [3.0, 3.0]  # Retry-After (3 s) wins over the 0.5 s and 1 s back-off


def test_backoff_is_exponential_and_capped():
    opts = youtube.FetchOptions("{id}", 5, 1.0, 5.0, 1, 1, None, 0, None, True)
    assert [youtube.backoff_delay(opts, n, None) for n in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert youtube.backoff_delay(opts, 0, 100.0) == 5.0


def test_connection_reset_is_a_retried_failure(tmp_path, loopback, media):
    loopback.routes["reset000000"] = Reset(60000, media["wav"])
    for seg_dl in (True, False):
        (tmp_path / str(seg_dl)).mkdir()
        row = youtube.fetch_clip(
            segment("reset000000"),
            tmp_path / str(seg_dl),
            options(loopback, retries=1, segment_download=seg_dl),
            True,
            RULES,
            sleep=lambda s: None,
        )
        assert row["status"] == "failed" and row["attempts"] == 2, row


def test_success_is_cached_and_never_downloaded_again(tmp_path, loopback, media):
    loopback.routes["wavAAAAAAAA"] = File(media["wav"])
    first = youtube.fetch_clip(segment("wavAAAAAAAA"), tmp_path, options(loopback), True, RULES)
    hits = loopback.hits["wavAAAAAAAA"]
    again = youtube.fetch_clip(segment("wavAAAAAAAA"), tmp_path, options(loopback), True, RULES)
    assert (
        again["status"] == "ok" and again["note"] == "cached" and again["audio"] == first["audio"]
    )
    assert loopback.hits["wavAAAAAAAA"] == hits


def test_without_keep_audio_the_download_is_kept_as_is(tmp_path, loopback, media):
    loopback.routes["m4aAAAAAAAA"] = File(media["m4a"], "audio/mp4")
    row = youtube.fetch_clip(
        segment("m4aAAAAAAAA"), tmp_path, options(loopback, segment_download=False), False, RULES
    )
    assert row["status"] == "ok" and row["audio"].endswith(".m4a")
    assert row["audio_offset_s"] == 5.0 and row["audio_duration_s"] == 10.0
    meta = json.loads((tmp_path / "m4aAAAAAAAA_5000.json").read_text())
    assert meta["file"] == "m4aAAAAAAAA_5000.m4a"
    samples = audio.decode(
        row["audio"], start_s=row["audio_offset_s"], duration_s=row["audio_duration_s"]
    )
    assert samples.size == 160000
    cached = youtube.fetch_clip(segment("m4aAAAAAAAA"), tmp_path, options(loopback), False, RULES)
    assert cached["note"] == "cached" and cached["audio"] == row["audio"]


def test_invalid_rows_are_rejected_without_any_request(tmp_path, loopback):
    bad = lists.Segment(
        row=4, line=5, error="'../../etc/p' is not a YouTube ID (11 characters of A-Z a-z 0-9 _ -)"
    )
    row = youtube.fetch_clip(bad, tmp_path, options(loopback), True, RULES)
    assert row["status"] == "rejected" and row["clip_id"] == "row4"
    assert sum(loopback.hits.values()) == 0


def test_parse_rate():
    assert youtube.parse_rate("500K") == 512000
    assert youtube.parse_rate("2M") == 2 << 20
    assert youtube.parse_rate("1000") == 1000
    assert youtube.parse_rate(None) is None
