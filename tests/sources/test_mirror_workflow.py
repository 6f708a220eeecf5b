"""The data stage on mirrors, through real Snakemake runs: an hf_parquet snapshot folder, a
WebDataset tar set, and a corpus whose ID list is served 80 % by that mirror and the rest by the
loopback yt-dlp server (YouTube as the gap filler)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import read_json, snakemake, tone
from loopback import File
from mirrors import clip_freq, encoded, parquet_mirror, tone_rows, wds_shard

pytestmark = [pytest.mark.slow, pytest.mark.network]
IDS = [f"vid{i:08d}" for i in range(10)]


def corpus_files(root: Path) -> dict:
    """The mirror: 8 listed IDs (one of them undecodable), one ID the list lacks; the tars: 5
    samples, one without its json, one repeating a key of the other shard."""
    rows = tone_rows(IDS[:7], seconds=3.0) + [{"id": IDS[7], "audio": os.urandom(4000)}]
    rows += tone_rows(["notlisted01"], seconds=3.0)
    files = parquet_mirror(root / "snap", rows, files=3)
    sample = lambda i, key, js=True: {
        "key": key,
        "audio": encoded("flac", 3.0, clip_freq(i), 44100, 1),
        "json": {"labels": [f"L{i}"]} if js else None,
    }
    wds_shard(
        root / "wds/shard-000000.tar", [sample(0, "a0"), sample(1, "a1", js=False), sample(2, "a2")]
    )
    wds_shard(root / "wds/shard-000001.tar", [sample(3, "b0"), sample(4, "a0")])
    listing = root / "eval_segments.csv"
    listing.write_text(
        "# YTID, start_seconds, end_seconds, positive_labels\n"
        + "".join(f'{v}, 0.000, 3.000, "/m/{i % 2}"\n' for i, v in enumerate(IDS))
    )
    return {"files": files, "list": str(listing)}


def workflow_config(root: Path, made: dict, url_template: str) -> dict:
    return {
        "sources": {
            "as_hf": {
                "type": "hf_parquet",
                "path": str(root / "snap"),
                "include": ["data/*.parquet"],
                "files_per_chunk": 2,
                "id_column": "video_id",
                "label_column": "labels",
            },
            "as_yt": {
                "type": "youtube",
                "list": made["list"],
                "format": "audioset",
                "url_template": url_template,
                "sleep_between_s": 0,
                "retries": 0,
            },
            "tars": {
                "type": "webdataset",
                "urls": [str(root / "wds/shard-{000000..000001}.tar")],
                "label_field": "labels",
            },
        },
        "corpora": {
            "audioset_eval": {
                "list": made["list"],
                "format": "audioset",
                "routes": ["as_hf", "as_yt"],
            }
        },
        "training": {"validation_sources": ["tars"]},
        "evaluation": {"enabled": False},
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from loopback import Server

    work = tmp_path_factory.mktemp("mirror-dag")
    made = corpus_files(work)
    media = tone(work / "yt.wav", 4.0)
    with Server() as server:
        for vid in IDS:
            server.routes[vid] = File(media)
        cfg = workflow_config(work, made, server.url_template)
        snakemake(work, cfg, "data")
        again = snakemake(work, cfg, "-n", "data")
        hits = dict(server.hits)
    return work, hits, again


def test_every_decodable_clip_lands_in_shards_under_its_id_and_the_rest_in_rejects(run):
    work, _, again = run
    out = work / "results/demo"
    shard_ids = {}
    for part in sorted((out / "shards").glob("*/*/*.parquet")):
        table = pq.read_table(part, columns=["clip_id", "source", "labels"]).to_pylist()
        for r in table:
            shard_ids.setdefault(r["clip_id"], set()).add(r["source"])
    assert set(shard_ids) == {*IDS, "a0", "a2", "b0"}
    assert all(len(sources) == 1 for sources in shard_ids.values())  # every ID once
    assert shard_ids[IDS[7]] == {"as_yt"} and shard_ids[IDS[0]] == {"as_hf"}
    rejects = {
        (r["source"], r["clip_id"]): r["reason"]
        for r in read_json(out / "dataset/rejects.json")["rejects"]
    }
    assert rejects[("as_hf", IDS[7])].startswith("undecodable:")
    assert rejects[("as_hf", "notlisted01")].startswith(
        "not listed: 'notlisted01' is not in corpus audioset_eval"
    )
    assert rejects[("tars", "a1")].startswith("no json: a1.flac in ")
    assert rejects[("tars", "a0")].startswith(
        "duplicate: key 'a0' was already obtained in chunk 00000"
    )
    assert len(rejects) == 4
    assert "Nothing to be done" in again.stdout + again.stderr


def test_the_coverage_report_says_where_each_id_came_from(run):
    work, hits, _ = run
    with open(work / "results/demo/data/coverage.csv") as fh:
        rows = list(csv.DictReader(fh))
    got = {
        (r["scope"], r["name"], r["route"], r["measure"], r["reason"]): int(r["count"])
        for r in rows
    }
    corpus = ("corpus", "audioset_eval")
    assert got[(*corpus, "", "listed", "")] == 10
    assert got[(*corpus, "as_hf", "obtained", "")] == 7
    assert got[(*corpus, "as_yt", "obtained", "")] == 3
    assert got[(*corpus, "", "missing", "")] == 0
    assert got[("source", "as_hf", "", "seen", "")] == 9
    assert got[("source", "as_hf", "", "rejected", "undecodable")] == 1
    assert got[("source", "as_yt", "", "skipped", "obtained by an earlier route")] == 7
    assert got[("source", "tars", "", "rejected", "no json")] == 1
    assert got[("source", "tars", "", "rejected", "duplicate")] == 1
    # nothing fetched twice: YouTube was asked only for the IDs the mirror lacked
    assert {v for v in IDS if hits.get(v)} == set(IDS[7:])
    png = work / "results/demo/data/coverage.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    manifest = read_json(work / "results/demo/manifests/as_yt/00000.json")
    assert manifest["skipped"] == {"obtained by an earlier route": 7}
    assert json.loads(json.dumps(manifest["provenance"]))["seed"] == 0
