"""Network faults against the loopback server, through the DAG's fetch jobs (yt-dlp, real sockets):
a connection reset mid-download, a server that stalls, a slow trickle, HTTP 429 and 500 with
Retry-After (held, or recovering after a few tries) and a permanent 404.

Each fault gets bounded retries with back-off (Retry-After honoured, capped), then a recorded
failure naming the cause; a server that recovers within the retries gives an ok clip. Every list
row ends in exactly one status. When the network heals, a forced rerun of the fetch jobs fetches
the failed IDs only (successes are not requested again) and no clip is lost."""

from __future__ import annotations

import time

import fault_util as fu
import pytest
from loopback import File, Flaky, Reset, Stall, Status, Trickle

pytestmark = [pytest.mark.slow, pytest.mark.network]

RETRIES = 2
RETRY_AFTER = 1
# ID → (what the server does, route factory, expected status in the faulty run, what its reason says)
CASES = {
    "good0000001": ("healthy", lambda m: File(m, "audio/mp4"), "ok", None),
    "reset000001": (
        "connection reset mid-body",
        lambda m: Reset(6000, m, "audio/mp4"),
        "failed",
        "(transient; 3 attempt(s))",
    ),
    "stall000001": (
        "stalls after the headers",
        lambda m: Stall(120),
        "failed",
        "(transient; 3 attempt(s))",
    ),
    "trickle0001": (
        "trickles 3 kB/s",
        lambda m: Trickle(m, 3000, "audio/mp4"),
        "failed",
        "timed out",
    ),
    "held4290001": (
        "HTTP 429 + Retry-After, always",
        lambda m: Status(429, {"Retry-After": RETRY_AFTER}),
        "failed",
        "HTTP 429",
    ),
    "held5000001": (
        "HTTP 500 + Retry-After, always",
        lambda m: Status(500, {"Retry-After": RETRY_AFTER}),
        "failed",
        "HTTP 500",
    ),
    "flaky429001": (
        "HTTP 429 + Retry-After twice, then ok",
        lambda m: Flaky(2, File(m, "audio/mp4"), 429, {"Retry-After": RETRY_AFTER}),
        "ok",
        None,
    ),
    "flaky500001": (
        "HTTP 500 once, then ok",
        lambda m: Flaky(1, File(m, "audio/mp4"), 500),
        "ok",
        None,
    ),
    "gone4040001": (
        "HTTP 404 (permanent)",
        lambda m: Status(404),
        "failed",
        "HTTP 404 Not Found (permanent; 1 attempt(s))",
    ),
}


def _config(listing, url_template) -> dict:
    return {
        "sources": {
            "yt": {
                "type": "youtube",
                "list": str(listing),
                "format": "audioset",
                "chunk_size": 5,
                "url_template": url_template,
                "sleep_between_s": 0,
                "retries": RETRIES,
                "backoff_s": 0.2,
                "max_backoff_s": 2.0,
                "socket_timeout_s": 1.5,
                "attempt_timeout_s": 6,
                "download_threads": 5,
            }
        },
        "training": {"validation_sources": []},
        "evaluation": {"enabled": False},
    }


def _clips(work) -> dict[str, dict]:
    """YouTube ID → its row in the fetch manifests."""
    out = {}
    for path in sorted((work / fu.OUT / "manifests/yt").glob("*.json")):
        for clip in fu.read_json(path)["clips"]:
            assert clip["ytid"] not in out, f"{clip['ytid']} recorded twice"
            out[clip["ytid"]] = clip
    return out


def test_network_faults_are_retried_bounded_then_recorded(tmp_path, figures):
    from helpers import tone

    media = tone(tmp_path / "media.m4a", 20.0, freq=523)
    work = tmp_path / "w"
    work.mkdir()
    listing = work / "segments.csv"
    listing.write_text(
        "# YTID, start_seconds, end_seconds, positive_labels\n"
        + "".join(f'{vid}, 1.000, 11.000, "/m/n"\n' for vid in CASES)
    )
    from loopback import Server

    with Server() as srv:
        for vid, (_, route, _, _) in CASES.items():
            srv.routes[vid] = route(media)
        cfg = _config(listing, srv.url_template)
        t0 = time.monotonic()
        faulty = fu.run(work, cfg, "data")
        elapsed = time.monotonic() - t0
        first = _clips(work)
        hits_first = dict(srv.hits)

        # The network heals: every ID is served. A forced rerun retries only what failed.
        for vid in CASES:
            srv.routes[vid] = File(media, "audio/mp4")
        healed = fu.run(work, cfg, "data", "--forcerun", "youtube_chunk")
        second = _clips(work)
        hits_second = {vid: srv.hits[vid] - hits_first.get(vid, 0) for vid in CASES}

    shard_ids = [c.rsplit("_", 1)[0] for c, s, _ in fu.accounting(work).values() if s == "ok"]
    results = {}
    for vid, (_, _, status, reason) in CASES.items():
        clip = first[vid]
        ok = clip["status"] == status and 1 <= clip.get("attempts", 0) <= RETRIES + 1
        if reason:
            ok = ok and reason in clip["reason"]
        if status == "ok":
            ok = ok and hits_second[vid] == 0  # a success is never requested again
        ok = ok and second[vid]["status"] == "ok" and vid in shard_ids
        results[vid] = ok
        figures.record(
            "network",
            f"{CASES[vid][0]} → {status}",
            tried=1,
            survived=int(ok),
            lost=int(vid not in shard_ids),
            attempts=clip.get("attempts"),
            requests=hits_first.get(vid, 0),
        )

    assert faulty.returncode == 0 and healed.returncode == 0
    assert set(first) == set(second) == set(CASES)  # every row once, in both runs
    for vid, (_, _, status, reason) in CASES.items():
        assert first[vid]["status"] == status, (vid, first[vid])
        if reason:
            assert reason in first[vid]["reason"], (vid, first[vid]["reason"])
    # Bounded: transient faults used every attempt and no more; a permanent error is not retried.
    assert {v: first[v]["attempts"] for v in CASES if first[v]["status"] == "failed"} == {
        "reset000001": 3,
        "stall000001": 3,
        "trickle0001": 3,
        "held4290001": 3,
        "held5000001": 3,
        "gone4040001": 1,
    }
    assert first["flaky429001"]["attempts"] == 3 and first["flaky500001"]["attempts"] == 2
    assert hits_first["gone4040001"] <= 2  # yt-dlp's page request (+ a HEAD at most): one attempt
    # Retry-After (1 s) was waited for between attempts; the trickle/stall limits ended the job in time.
    assert elapsed >= 2 * RETRY_AFTER and elapsed < 120
    assert all(hits_second[v] == 0 for v in CASES if first[v]["status"] == "ok")
    assert all(hits_second[v] >= 1 for v in CASES if first[v]["status"] == "failed")
    assert sorted(shard_ids) == sorted(CASES) and all(results.values()), results
