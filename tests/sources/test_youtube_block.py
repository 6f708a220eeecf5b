"""YouTube's session-level blocks: the error classes, the guard's bookkeeping, and whole chunk jobs
against the loopback yt-dlp server refusing every request after N clips (python -m, real yt-dlp)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from helpers import REPO, tone
from loopback import File

from dasheng_pipeline.sources import lists, youtube

SCHEMA = yaml.safe_load((REPO / "config/schema.yaml").read_text())


@pytest.mark.parametrize(
    "message, kind",
    [
        (
            "[youtube] abcdefghijk: Sign in to confirm you\u2019re not a bot. Use --cookies",
            "session",
        ),
        ("[youtube] abcdefghijk: This content isn't available, try again later.", "session"),
        (
            "[youtube] abcdefghijk: Video unavailable. This video has been removed by the uploader",
            "permanent",
        ),
        (
            "[youtube] abcdefghijk: Private video. Sign in if you've been granted access",
            "permanent",
        ),
        (
            "[youtube] abcdefghijk: This video is no longer available because the YouTube "
            "account associated with this video has been terminated.",
            "permanent",
        ),
        (
            "[youtube] abcdefghijk: Video unavailable. This video contains content from X, "
            "who has blocked it on copyright grounds",
            "permanent",
        ),
        ("ffmpeg exited with code 1", "transient"),
    ],
)
def test_errors_are_classified(message, kind):
    from yt_dlp.utils import DownloadError

    assert youtube._classify(DownloadError(f"ERROR: {message}"))["kind"] == kind


def test_guard_pauses_on_a_burst_and_stops_when_the_block_persists():
    clock = [0.0]
    sleeps = []

    def sleep(s):
        sleeps.append(s)
        clock[0] += s

    guard = youtube.SessionGuard(
        burst=3, pause_s=60, max_pauses=2, sleep=sleep, clock=lambda: clock[0]
    )
    ok = {"status": "ok"}
    forbidden = {
        "status": "failed",
        "block": "suspect",
        "reason": "HTTP 403 Forbidden (transient; 1 attempt(s))",
    }
    assert guard.outcome(0, ok, guard.wait()) == ([0], [])
    assert guard.outcome(1, forbidden, 0) == ([], [])  # held: one 403 is this clip's own
    assert guard.outcome(2, ok, 0) == ([1, 2], [])  # a success in between: 1 is an ordinary failure
    for i in (3, 4):
        assert guard.outcome(i, forbidden, 0) == ([], [])
    assert guard.outcome(5, forbidden, 0) == ([], [3, 4, 5])  # the third in a row: a block
    assert guard.outcome(6, forbidden, 0) == ([], [6])  # started before the pause: no second one
    assert guard.wait() == 1 and sum(sleeps) == 60 and guard.reason.startswith("3 clips in a row")
    session = {
        "status": "failed",
        "block": "session",
        "reason": "Sign in to confirm (transient; 1 attempt(s))",
    }
    assert guard.outcome(3, session, 1) == ([], [3])  # a bot check blocks at once
    assert guard.wait() == 2 and sum(sleeps) == 60 + 120  # the pause doubles
    guard.outcome(3, session, 2)
    assert guard.stopped and guard.wait() is None and guard.pauses == 2


@pytest.fixture
def listing(tmp_path):
    ids = [f"clip{i:07d}" for i in range(6)]
    path = tmp_path / "segments.csv"
    path.write_text("".join(f'{v}, 0.000, 2.000, "/m/x"\n' for v in ids))
    index = tmp_path / "index.json"
    index.write_text(json.dumps(lists.build_index(path, "audioset", 100, 10.0)))
    return ids, path, index


def chunk_job(tmp_path, listing, url_template, **cfg):
    src = {
        k: v["default"]
        for k, v in SCHEMA["$defs"]["youtube_source"]["properties"].items()
        if "default" in v
    }
    src.update(
        type="youtube",
        list=str(listing[1]),
        url_template=url_template,
        sleep_between_s=0,
        retries=0,
    )
    src.update(cfg)
    audio_cfg = {
        k: v["default"]
        for k, v in SCHEMA["properties"]["audio"]["properties"].items()
        if "default" in v
    }
    params = {"source": "yt", "source_cfg": src, "audio": audio_cfg, "seed": 0}
    cmd = [
        sys.executable,
        "-m",
        "dasheng_pipeline.sources.youtube",
        "chunk",
        "--list",
        str(listing[1]),
    ]
    cmd += ["--index", str(listing[2]), "--chunk", "00000", "--params", json.dumps(params)]
    cmd += ["--out", str(tmp_path / "m.json"), "--audio-dir", str(tmp_path / "audio")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.network
def test_a_persistent_block_stops_the_job_with_75_and_a_rerun_completes(
    tmp_path, loopback, listing
):
    media = tone(tmp_path / "a.wav", 3.0)
    for vid in listing[0]:
        loopback.routes[vid] = File(media)
    loopback.block(after=2)  # YouTube serves 2 clips, then 403 for everything
    pause = {"block_burst": 2, "block_pause_min": 0.005, "block_pauses": 1}
    stopped = chunk_job(tmp_path, listing, loopback.url_template, **pause)
    assert stopped.returncode == 75, stopped.stderr
    message = stopped.stderr.strip().splitlines()[-1]
    assert message.startswith(
        "error: yt chunk 00000: YouTube blocks this session (2 clips in a row failed with HTTP 403 Forbidden)"
    )
    assert "4 clip(s) left for a rerun, none marked failed" in message and "cookies" in message
    assert "pauses 0.3 s (pause 1 of 1)" in stopped.stdout
    assert not (tmp_path / "m.json").exists()  # nothing recorded as failed: no manifest at all
    journal = [
        json.loads(x)["row"] for x in (tmp_path / "audio/.journal.jsonl").read_text().splitlines()
    ]
    assert [r["status"] for r in journal] == ["ok", "ok"]
    assert loopback.blocked_hits == 4  # 2 clips x (first try + the try after the pause)
    loopback.unblock()
    served = dict(loopback.hits)
    rerun = chunk_job(tmp_path, listing, loopback.url_template, **pause)
    assert rerun.returncode == 0, rerun.stderr
    doc = json.loads((tmp_path / "m.json").read_text())
    assert doc["summary"] == {"ok": 6, "failed": 0, "rejected": 0}
    assert [c["clip_id"] for c in doc["clips"]] == [f"{v}_0" for v in listing[0]]
    assert all(loopback.hits[v] == served[v] for v in listing[0][:2])  # the done ones: not again
    assert not (tmp_path / "audio/.journal.jsonl").exists()


@pytest.mark.network
def test_a_block_that_lifts_during_the_pause_costs_nothing(tmp_path, loopback, listing):
    media = tone(tmp_path / "a.wav", 3.0)
    for vid in listing[0]:
        loopback.routes[vid] = File(media)
    loopback.block(after=3, seconds=1.0)
    done = chunk_job(tmp_path, listing, loopback.url_template, block_burst=1, block_pause_min=0.03)
    assert done.returncode == 0, done.stderr
    doc = json.loads((tmp_path / "m.json").read_text())
    assert doc["summary"] == {"ok": 6, "failed": 0, "rejected": 0}
    assert "session-level block (1 clips in a row failed with HTTP 403 Forbidden)" in done.stdout
