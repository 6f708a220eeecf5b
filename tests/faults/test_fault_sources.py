"""Faults of the mirror sources and of YouTube as a gap filler, through real Snakemake runs (data
stage only):

* a WebDataset shard cut short (truncated tar): the samples before the damage are used, one
  rejected row names the shard, the DAG completes;
* an archive whose listed sha256 does not match (fetched once more, then rejected with the reason)
  next to one whose transfer is cut mid-body (resumed with HTTP Range): the DAG completes;
* kill -9 of the whole run while a Parquet chunk job is mid-file, then a rerun: the shards and
  manifests are byte-identical to an uninterrupted run's, no clip is lost or duplicated;
* YouTube refusing the session after 2 clips (a burst of HTTP 403): the job pauses, then stops with
  exit status 75 and its one-line message; nothing is marked failed; once the block lifts, a
  rerun completes with the uninterrupted run's clips.
"""

from __future__ import annotations

import hashlib
import os
import random
import tarfile
from pathlib import Path

import fault_util as fu
import pytest
from helpers import tone
from loopback import File, Reset, Sequence
from mirrors import add_member, clip_freq, encoded, parquet_mirror, tone_rows, wds_shard

pytestmark = [pytest.mark.slow, pytest.mark.network]
IDS = [f"vid{i:08d}" for i in range(16)]


def mirror_files(root: Path, server) -> dict:
    """A Parquet snapshot (16 clips of 3 s, 48 kHz stereo FLAC, 8 per file), a tar set whose second
    shard is truncated in its third sample, and two archives on the loopback server: one served
    in two cut transfers, one whose listed sha256 is wrong."""
    parquet_mirror(root / "snap", tone_rows(IDS, seconds=3.0), files=2)
    sample = lambda i, key: {
        "key": key,
        "audio": encoded("flac", 2.0, clip_freq(i), 44100, 1),
        "json": {"labels": [f"L{i}"]},
    }
    wds_shard(root / "wds/shard-000000.tar", [sample(0, "w0"), sample(1, "w1")])
    whole = wds_shard(root / "whole.tar", [sample(2, "w2"), sample(3, "w3"), sample(4, "w4")])
    data = whole.read_bytes()
    (root / "wds/shard-000001.tar").write_bytes(data[: int(len(data) * 0.8)])
    archives = []
    for n in range(2):
        path = root / f"raw_30s_audio-{n:02d}.tar"
        with tarfile.open(path, "w") as tf:
            for i in range(2):
                add_member(
                    tf, f"{n:02d}/{100 * n + i}.mp3", encoded("mp3", 2.0, clip_freq(i), 44100, 2)
                )
        archives.append(path)
    server.routes[archives[0].name] = Sequence([Reset(30000, archives[0]), File(archives[0])])
    server.routes[archives[1].name] = File(archives[1])
    base = server.url_template.replace("{id}", "")
    good = hashlib.sha256(archives[0].read_bytes()).hexdigest()
    return {
        "archives": [
            {"url": base + archives[0].name, "sha256": good},
            {"url": base + archives[1].name, "sha256": "ab" * 32},  # not the file's
        ]
    }


def mirror_config(made: dict) -> dict:
    """Paths relative to the work folder (Snakemake runs there): two runs read alike."""
    return {
        "sources": {
            "snap": {
                "type": "hf_parquet",
                "path": "snap",
                "id_column": "video_id",
                "label_column": "labels",
            },
            "tars": {
                "type": "webdataset",
                "urls": ["wds/shard-{000000..000001}.tar"],
                "label_field": "labels",
            },
            "jam": {"type": "http_archive", "archives": made["archives"], "backoff_s": 0.1},
        },
        "shards": {"max_rows": 3, "row_group_size": 2},
        "training": {"validation_sources": []},
        "evaluation": {"enabled": False},
    }


@pytest.fixture(scope="module")
def archive_server():
    from loopback import Server

    with Server() as srv:
        yield srv


@pytest.fixture(scope="module")
def mirror_reference(tmp_path_factory, archive_server):
    work = tmp_path_factory.mktemp("mirror-reference")
    made = mirror_files(work, archive_server)
    fu.run(work, mirror_config(made), "data")
    return work, dict(archive_server.hits)


def _rejects(work: Path) -> dict:
    return {
        (r["source"], r["clip_id"]): r["reason"]
        for r in fu.read_json(work / fu.OUT / "dataset/rejects.json")["rejects"]
    }


def test_truncated_tar_keeps_the_samples_before_the_damage(mirror_reference, figures):
    work, _ = mirror_reference
    got = fu.accounting(work)
    ok = sorted(
        cid for (src, _, _), (cid, status, _) in got.items() if src == "tars" and status == "ok"
    )
    reason = _rejects(work).get(("tars", "wds/shard-000001.tar"), "")
    lost = len({"w0", "w1", "w2", "w3"} - set(ok))
    survived = lost == 0 and reason.startswith("truncated tar: ") and "w4" not in ok
    figures.record(
        "mirror input",
        "truncated tar (cut in its 3rd sample)",
        tried=1,
        survived=int(survived),
        lost=lost,
    )
    assert ok == ["w0", "w1", "w2", "w3"], ok
    assert reason.startswith("truncated tar: ") and "after 4 member(s)" in reason


def test_checksum_mismatch_is_refetched_once_then_rejected_and_a_cut_transfer_resumes(
    mirror_reference, figures
):
    work, hits = mirror_reference
    got = fu.accounting(work)
    ok = sorted(
        cid for (src, _, _), (cid, status, _) in got.items() if src == "jam" and status == "ok"
    )
    bad = [r for (src, _), r in _rejects(work).items() if src == "jam"]
    survived = ok == ["00/0", "00/1"] and len(bad) == 1 and bad[0].startswith("checksum mismatch: ")
    lost = 2 - len(ok)
    figures.record(
        "mirror input",
        "archive sha256 mismatch (+ a cut transfer)",
        tried=1,
        survived=int(survived),
        lost=lost,
        requests_bad=hits.get("raw_30s_audio-01.tar"),
        requests_cut=hits.get("raw_30s_audio-00.tar"),
    )
    assert ok == ["00/0", "00/1"]
    assert (
        len(bad) == 1 and bad[0].startswith("checksum mismatch: ") and "in two downloads" in bad[0]
    )
    assert hits["raw_30s_audio-01.tar"] == 2 and hits["raw_30s_audio-00.tar"] == 2


def test_kill_9_mid_parquet_file_then_rerun(tmp_path, mirror_reference, archive_server, figures):
    ref, _ = mirror_reference
    work = tmp_path / "w"
    work.mkdir()
    out = work / fu.OUT
    cfg = mirror_config(mirror_files(work, archive_server))
    proc = fu.start(work, cfg, "data")
    # The kill point is a number of clips written (a job of 8 short rows ends within a poll or two
    # of a time-drawn point on a fast machine): the job is frozen the moment it is seen there.
    at_clip = random.Random(0).randint(2, 6)
    ready = lambda: len(list((out / "audio/snap").rglob("*.flac"))) >= at_clip
    try:
        fu.kill_at_random_point(
            proc, "dasheng_pipeline.sources.hf_parquet", None, 0.0, ready=ready, freeze=True
        )
        broken = fu.untrusted_finals(out)
        fu.run(work, cfg, "--unlock")
        fu.run(work, cfg, "data")
    finally:
        fu.sweep(str(work))
    ref_account, got_account = fu.accounting(ref), fu.accounting(work)
    lost = fu.clips_lost(ref_account, got_account)
    ids = [cid for (src, _, _), (cid, _, _) in got_account.items() if src == "snap"]
    same = fu.digests(ref / fu.OUT) == fu.digests(out)
    survived = lost == 0 and same and not broken and len(ids) == len(set(ids)) == 16
    figures.record(
        "kill -9",
        "Parquet chunk job mid-file",
        tried=1,
        survived=int(survived),
        lost=lost,
        at_clip=at_clip,
    )
    assert broken == [] and lost == 0
    assert len(ids) == len(set(ids)) == 16  # every row once, none twice
    assert same


def yt_corpus(root: Path, url_template: str) -> dict:
    """A corpus of 8 IDs: the mirror has 4, YouTube (the loopback server) the other 4."""
    ids = [f"yt{i:09d}" for i in range(8)]
    root.mkdir(parents=True, exist_ok=True)
    listing = root / "segments.csv"
    listing.write_text("".join(f'{v}, 0.000, 2.000, "/m/x"\n' for v in ids))
    parquet_mirror(root / "snap", tone_rows(ids[:4], seconds=2.0), files=1)
    return {
        "sources": {
            "m": {"type": "hf_parquet", "path": str(root / "snap"), "id_column": "video_id"},
            "yt": {
                "type": "youtube",
                "list": str(listing),
                "url_template": url_template,
                "sleep_between_s": 0,
                "retries": 0,
                "block_burst": 2,
                "block_pause_min": 0.005,
                "block_pauses": 1,
            },
        },
        "corpora": {"c": {"list": str(listing), "routes": ["m", "yt"]}},
        "training": {"validation_sources": []},
        "evaluation": {"enabled": False},
    }, ids


def test_youtube_block_pauses_stops_with_75_and_the_rerun_completes(tmp_path, figures):
    from loopback import Server

    media = tone(tmp_path / "a.wav", 3.0)
    with Server() as srv:
        cfg, ids = yt_corpus(tmp_path / "ref", srv.url_template)
        for vid in ids:
            srv.routes[vid] = File(media)
        fu.run(tmp_path / "ref", cfg, "data")
        cfg, _ = yt_corpus(tmp_path / "w", srv.url_template)
        srv.block(after=2)  # after 2 clips YouTube answers 403 to everything
        blocked = fu.run(tmp_path / "w", cfg, "data", check=False)
        log = (tmp_path / "w" / fu.OUT / "logs/sources/yt/00000.log").read_text()
        journal = (
            (tmp_path / "w" / fu.OUT / "audio/yt/00000/.journal.jsonl").read_text().splitlines()
        )
        refused = srv.blocked_hits
        srv.unblock()
        fu.run(tmp_path / "w", cfg, "data")
    lost = fu.clips_lost(fu.accounting(tmp_path / "ref"), fu.accounting(tmp_path / "w"))
    last = log.strip().splitlines()[-1]
    survived = (
        blocked.returncode != 0
        and "exit status 75" in blocked.stdout + blocked.stderr
        and "none marked failed" in last
        and all('"status": "ok"' in line for line in journal)
        and lost == 0
    )
    figures.record(
        "youtube block",
        "403 burst after 2 clips: pause, exit 75, rerun",
        tried=1,
        survived=int(survived),
        lost=lost,
        refused_requests=refused,
    )
    assert "exit status 75" in blocked.stdout + blocked.stderr
    assert (
        last.startswith("error: yt chunk 00000: YouTube blocks this session")
        and "none marked failed" in last
    )
    assert len(journal) == 2 and all('"status": "ok"' in line for line in journal)
    assert not os.path.exists(tmp_path / "w" / fu.OUT / "manifests/yt/00000.json") or lost == 0
    assert lost == 0
