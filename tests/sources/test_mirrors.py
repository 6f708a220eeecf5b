"""The mirror sources as chunk jobs see them (no Snakemake): Parquet rows with embedded bytes from
a snapshot folder and through a loopback Hugging Face hub, WebDataset shards and tar.gz archives of
video clips, HTTP archives with resume and checksums, the key table across chunks, and a corpus
whose mirror holds 80 % of the IDs while YouTube (the loopback yt-dlp server) fills the rest."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import REPO
from loopback import File, Hub, Reset, Sequence
from mirrors import clip_freq, encoded, parquet_mirror, tone_rows, wds_shard

from dasheng_pipeline.common import audio, manifest
from dasheng_pipeline.features import mel
from dasheng_pipeline.sources import (
    coverage,
    hf_parquet,
    http_archive,
    mirror,
    remote,
    routes,
    tars,
)

pytestmark = pytest.mark.network
SCHEMA = yaml.safe_load((REPO / "config/schema.yaml").read_text())
IDS = [f"vid{i:08d}" for i in range(10)]


def defaults(section: dict) -> dict:
    return {k: v["default"] for k, v in section["properties"].items() if "default" in v}


AUDIO = defaults(SCHEMA["properties"]["audio"])


def params(kind: str, files, source: str = "src", route=None, **cfg) -> dict:
    src = {**defaults(SCHEMA["$defs"][f"{kind}_source"]), "type": kind, **cfg}
    return {
        "source": source,
        "source_cfg": src,
        "files": files,
        "audio": AUDIO,
        "seed": 0,
        "route": route,
    }


def run(module, tmp: Path, chunk: str, p: dict) -> dict:
    out = tmp / "manifests" / p["source"] / f"{chunk}.json"
    return mirror.run_chunk(
        module.items, chunk, p, str(out), str(tmp / "audio" / p["source"] / chunk), str(tmp / "dl")
    )


def peak_hz(path: str) -> float:
    x = audio.decode(path)
    return float(np.argmax(np.abs(np.fft.rfft(x))) * audio.SAMPLE_RATE / x.size)


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> tuple[Path, list[str]]:
    """A dataset snapshot: 8 good rows (FLAC and MP3 at 48 kHz stereo), one with undecodable bytes
    and one without bytes, over two Parquet files."""
    root = tmp_path_factory.mktemp("snapshot")
    rows = tone_rows(IDS[:6]) + [
        {"id": cid, "audio": encoded("mp3", 1.5, clip_freq(6 + i)), "labels": ["/m/mp3"]}
        for i, cid in enumerate(IDS[6:8])
    ]
    rows += [{"id": "garbage0001", "audio": os.urandom(3000)}, {"id": "nobytes0001", "audio": None}]
    return root, parquet_mirror(root, rows, files=2)


def test_parquet_rows_decode_to_16k_mono_with_ids_labels_and_reasons(tmp_path, snapshot):
    root, files = snapshot
    p = params("hf_parquet", files, path=str(root), id_column="video_id", label_column="labels")
    doc = run(hf_parquet, tmp_path, "00000", p)
    by_id = {c["clip_id"]: c for c in doc["clips"]}
    assert [c["clip_id"] for c in doc["clips"]] == [*IDS[:8], "garbage0001", "nobytes0001"]
    assert doc["summary"] == {"ok": 8, "failed": 0, "rejected": 2}
    assert by_id["garbage0001"]["reason"].startswith("undecodable:")
    assert by_id["garbage0001"]["origin"] == "data/train-00001-of-00002.parquet row 3"
    assert by_id["nobytes0001"]["reason_class"] == "no audio"
    for i, cid in enumerate(IDS[:8]):
        assert by_id[cid]["labels"] == (["/m/mp3"] if i >= 6 else [f"/m/{i % 3}"])
        assert abs(peak_hz(by_id[cid]["audio"]) - clip_freq(i)) < 2
    x = audio.decode(by_id[IDS[0]]["audio"])
    assert abs(x.size - 1.5 * audio.SAMPLE_RATE) < 200  # 48 kHz stereo → 16 kHz mono


def test_snapshot_and_hub_give_byte_identical_shards(tmp_path, snapshot, monkeypatch):
    root, files = snapshot
    features = {
        "mel": defaults(SCHEMA["properties"]["mel"]),
        "audio": AUDIO,
        "shards": defaults(SCHEMA["properties"]["shards"]),
        "seed": 0,
    }
    local = params("hf_parquet", files, path=str(root), id_column="video_id", label_column="labels")
    with Hub() as hub:
        hub.add("datasets", "agk/audioset-test", {f: (root / f).read_bytes() for f in files})
        for key, value in hub.env(tmp_path / "hf-home").items():
            monkeypatch.setenv(key, value)
        assert (
            hf_parquet.list_files(
                {"repo": "agk/audioset-test", "revision": Hub.SHA, "include": ["data/*.parquet"]}
            )
            == files
        )
        via_hub = params(
            "hf_parquet",
            files,
            repo="agk/audioset-test",
            revision=Hub.SHA,
            id_column="video_id",
            label_column="labels",
        )
        digests = []
        for name, p in (("snap", local), ("hub", via_hub)):
            work = tmp_path / name
            doc = run(hf_parquet, work, "00000", p)
            assert doc["summary"]["ok"] == 8
            mel.run_chunk(
                str(work / "manifests/src/00000.json"),
                str(work / "shards"),
                str(work / "s.json"),
                features,
            )
            parts = sorted((work / "shards").glob("*.parquet"))
            digests.append([hashlib.sha256(x.read_bytes()).hexdigest() for x in parts])
        assert not list((tmp_path / "hub/dl").rglob("*.parquet"))  # fetched, used, deleted
    assert digests[0] == digests[1] and len(digests[0]) == 1


def test_hub_errors_name_the_repo_and_revision(tmp_path, snapshot, monkeypatch):
    root, files = snapshot
    with Hub() as hub:
        hub.add("datasets", "agk/audioset-test", {files[0]: (root / files[0]).read_bytes()})
        for key, value in hub.env(tmp_path / "hf-home").items():
            monkeypatch.setenv(key, value)
        with pytest.raises(
            ValueError, match="'agk/audioset-test' at revision 'v9': no such revision"
        ):
            hf_parquet.list_files({"repo": "agk/audioset-test", "revision": "v9", "include": ["*"]})
        p = params(
            "hf_parquet",
            [files[0], "data/missing.parquet"],
            repo="agk/absent",
            id_column="video_id",
        )
        absent = run(hf_parquet, tmp_path / "a", "00000", p)
        p = params(
            "hf_parquet",
            [files[0], "data/missing.parquet"],
            repo="agk/audioset-test",
            id_column="video_id",
        )
        partial = run(hf_parquet, tmp_path / "b", "00000", p)
    assert [c["status"] for c in absent["clips"]] == ["rejected", "rejected"]
    assert absent["clips"][0]["reason"] == (
        "not found: Hugging Face dataset 'agk/absent' at revision 'main': no such repo "
        "(check the repo key; a private repo needs HF_TOKEN)"
    )
    assert partial["summary"]["ok"] == 5 and partial["clips"][-1]["unit"] == "file"
    assert partial["clips"][-1]["reason"].endswith("has no file 'data/missing.parquet'")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Dasheng's tar layout: shard 0 (3 samples, one without its json), shard 1 (2 samples, one
    repeating a key of shard 0), shard 2 truncated in its third sample."""
    root = tmp_path_factory.mktemp("wds")
    sample = lambda i, key, js=True: {
        "key": key,
        "audio": encoded("flac", 1.0, clip_freq(i), 44100, 1),
        "json": {"labels": [f"L{i}"], "duration": 1.0} if js else None,
    }
    wds_shard(
        root / "shard-000000.tar", [sample(0, "a0"), sample(1, "a1", js=False), sample(2, "a2")]
    )
    wds_shard(root / "shard-000001.tar", [sample(3, "b0"), sample(4, "a0")])
    whole = wds_shard(root / "whole.tar", [sample(5, "c0"), sample(6, "c1"), sample(7, "c2")])
    data = whole.read_bytes()
    (root / "shard-000002.tar").write_bytes(data[: int(len(data) * 0.8)])
    whole.unlink()
    return root


def test_webdataset_shards_json_labels_missing_json_truncation_and_duplicates(tmp_path, shards):
    urls = remote.expand([str(shards / "shard-{000000..000002}.tar")])
    assert [Path(u).name for u in urls] == [f"shard-00000{i}.tar" for i in range(3)]
    docs = [
        run(tars, tmp_path, f"{i:05d}", params("webdataset", [u], label_field="labels"))
        for i, u in enumerate(urls)
    ]
    rows = {c["clip_id"]: c for c in docs[0]["clips"]}
    assert rows["a0"]["labels"] == ["L0"] and rows["a2"]["status"] == "ok"
    assert (
        rows["a1"]["reason"].startswith("no json: a1.flac in ")
        and rows["a1"]["status"] == "rejected"
    )
    trunc = docs[2]["clips"]
    assert [c["clip_id"] for c in trunc if c["status"] == "ok"] == ["c0", "c1"]
    assert trunc[-1]["unit"] == "file" and trunc[-1]["reason"].startswith("truncated tar: ")
    # the same key in two chunks: the key table keeps the first, the mel job rejects the second
    paths = [str(tmp_path / f"manifests/src/{i:05d}.json") for i in range(3)]
    keys = tmp_path / "keys.parquet"
    assert routes.build_keys(paths, str(keys), {"source": "src", "seed": 0}) == {
        "keys": 5,
        "duplicates": 1,
    }
    final = mel.read_fetch(paths[1], str(keys))["clips"]
    dup = {c["clip_id"]: c for c in final}["a0"]
    assert dup["status"] == "rejected" and dup["reason_class"] == "duplicate"
    assert "chunk 00000" in dup["reason"] and manifest.summary(final) == {
        "ok": 1,
        "failed": 0,
        "rejected": 1,
    }


def test_targz_of_video_clips_gives_their_audio_tracks(tmp_path):
    archive = tmp_path / "vggsound_00.tar.gz"
    clips = [
        {
            "key": f"video/---g-f_I2y{i}_00000{i}",
            "audio": encoded("mp4", 2.0, clip_freq(i), video=True),
            "ext": "mp4",
        }
        for i in range(2)
    ]
    wds_shard(archive, clips, mode="w:gz")
    p = params("webdataset", [str(archive)], json="ignore", id_regex="([^/]+)$")
    doc = run(tars, tmp_path, "00000", p)
    assert [c["clip_id"] for c in doc["clips"]] == ["---g-f_I2y0_000000", "---g-f_I2y1_000001"]
    assert doc["summary"]["ok"] == 2
    assert abs(peak_hz(doc["clips"][1]["audio"]) - clip_freq(1)) < 2
    assert not list(tmp_path.rglob(f"*{'.tmp-'}*"))  # the MP4s' temporary copies are gone


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("jamendo")
    out = {}
    for n in range(2):
        path = root / f"raw_30s_audio-{n:02d}.tar"
        with tarfile.open(path, "w") as tf:
            info = tarfile.TarInfo(f"{n:02d}")
            info.type = tarfile.DIRTYPE
            tf.addfile(info)
            for i in range(2):
                data = encoded("mp3", 1.0, clip_freq(2 * n + i), 44100, 2)
                from mirrors import add_member

                add_member(tf, f"{n:02d}/{1000 * n + i}.mp3", data)
        out[path.name] = (path, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def test_archives_resume_a_cut_download_and_reject_a_checksum_mismatch(
    tmp_path, loopback, archives
):
    (a, sha_a), (b, _) = archives.values()
    loopback.routes[a.name] = Sequence(
        [Reset(20000, a, "application/x-tar"), File(a, "application/x-tar")]
    )
    loopback.routes[b.name] = File(b, "application/x-tar")
    base = loopback.url_template.replace("{id}", "")
    listed = [{"url": base + a.name, "sha256": sha_a}, {"url": base + b.name, "sha256": "0" * 64}]
    doc = run(http_archive, tmp_path, "00000", params("http_archive", listed, backoff_s=0.01))
    assert [c["clip_id"] for c in doc["clips"][:2]] == ["00/0", "00/1"]
    assert doc["summary"] == {"ok": 2, "failed": 0, "rejected": 1}
    bad = doc["clips"][2]
    assert bad["unit"] == "file" and bad["reason_class"] == "checksum mismatch"
    assert f"{base}{b.name} has sha256 " in bad["reason"] and "in two downloads" in bad["reason"]
    assert loopback.hits[a.name] == 2 and loopback.hits[b.name] == 2  # resumed once; fetched twice
    assert not list((tmp_path / "dl").iterdir())  # verified, used, deleted


def test_download_resumes_with_range_and_keeps_a_partial_file(tmp_path, loopback, archives):
    path, sha = archives["raw_30s_audio-00.tar"]
    loopback.routes["x.tar"] = Reset(15000, path)
    url = loopback.url_template.replace("{id}", "x.tar")
    opts = remote.HttpOptions(timeout_s=5, retries=1, backoff_s=0)
    with pytest.raises(remote.FetchError, match="a rerun resumes the download"):
        remote.download(url, tmp_path / "x.tar", opts, sha256=sha, sleep=lambda s: None)
    assert (tmp_path / "x.tar.part").stat().st_size == 30000  # two cut transfers, appended
    loopback.routes["x.tar"] = File(path)
    got = remote.download(url, tmp_path / "x.tar", opts, sha256=sha)
    assert got.read_bytes() == path.read_bytes() and not (tmp_path / "x.tar.part").exists()


def test_a_corpus_takes_each_id_from_the_first_route_that_has_it(tmp_path, loopback):
    """The mirror holds 8 of the 10 listed IDs (and one the list does not hold); YouTube (the
    loopback yt-dlp server, which has every ID) fills the other 2 and is never asked for the 8."""
    from helpers import tone

    from dasheng_pipeline.sources import lists, youtube

    listing = tmp_path / "eval_segments.csv"
    listing.write_text(
        "# YTID, start_seconds, end_seconds, positive_labels\n"
        + "".join(f'{v}, 0.000, 2.000, "/m/x"\n' for v in IDS)
    )
    ids = tmp_path / "corpora/as/ids.parquet"
    routes.write_ids(str(listing), "audioset", 10.0, str(ids), {"seed": 0})
    root = tmp_path / "mirror"
    files = parquet_mirror(root, tone_rows(IDS[:8] + ["notlisted01"]), files=1)
    mirror_route = {"corpus": "as", "ids": str(ids), "earlier": []}
    p = params("hf_parquet", files, "as_hf", mirror_route, path=str(root), id_column="video_id")
    raw = run(hf_parquet, tmp_path / "raw", "00000", p)
    assert raw["clips"][-1]["reason_class"] == "not listed"
    keys = tmp_path / "keys/as_hf.parquet"
    routes.build_keys(
        [str(tmp_path / "raw/manifests/as_hf/00000.json")],
        str(keys),
        {"source": "as_hf", "seed": 0},
    )
    media = tone(tmp_path / "media.wav", 3.0)
    for vid in IDS:
        loopback.routes[vid] = File(media)
    yt_cfg = {
        **defaults(SCHEMA["$defs"]["youtube_source"]),
        "type": "youtube",
        "list": str(listing),
        "url_template": loopback.url_template,
        "sleep_between_s": 0.0,
    }
    index = tmp_path / "index.json"
    atomic_index = lists.build_index(listing, "audioset", 100, 10.0)
    index.write_text(json.dumps(atomic_index))
    yt_params = {
        "source": "as_yt",
        "source_cfg": yt_cfg,
        "audio": AUDIO,
        "seed": 0,
        "route": {"corpus": "as", "earlier": [str(keys)]},
    }
    youtube.run_chunk(
        str(listing),
        str(index),
        "00000",
        yt_params,
        str(tmp_path / "final/as_yt.json"),
        str(tmp_path / "audio/as_yt"),
    )
    yt = manifest.read(tmp_path / "final/as_yt.json")
    assert [c["clip_id"] for c in yt["clips"]] == IDS[8:] and yt["summary"]["ok"] == 2
    assert yt["skipped"] == {"obtained by an earlier route": 8}
    assert sum(loopback.hits[v] for v in IDS[:8]) == 0 and all(loopback.hits[v] for v in IDS[8:])
    layout = {
        "sources": {
            "as_hf": {
                "manifests": [str(tmp_path / "raw/manifests/as_hf/00000.json")],
                "keys": str(keys),
            },
            "as_yt": {"manifests": [str(tmp_path / "final/as_yt.json")]},
        },
        "corpora": {"as": {"ids": str(ids), "routes": ["as_hf", "as_yt"]}},
        "seed": 0,
    }
    rows = coverage.build(layout, str(tmp_path / "coverage.csv"), str(tmp_path / "coverage.png"))
    corpus = {
        (r["measure"], r["route"], r["reason"]): r["count"] for r in rows if r["scope"] == "corpus"
    }
    assert corpus[("listed", "", "")] == 10 and corpus[("missing", "", "")] == 0
    assert corpus[("obtained", "as_hf", "")] == 8 and corpus[("obtained", "as_yt", "")] == 2
    src = {
        (r["name"], r["measure"], r["reason"]): r["count"] for r in rows if r["scope"] == "source"
    }
    assert src[("as_hf", "seen", "")] == 9 and src[("as_hf", "rejected", "not listed")] == 1
    assert src[("as_yt", "skipped", "obtained by an earlier route")] == 8
    assert (tmp_path / "coverage.png").read_bytes()[:4] == b"\x89PNG"


def test_without_keep_audio_rows_are_kept_as_they_came_and_mel_decodes_them(tmp_path, snapshot):
    root, files = snapshot
    p = params("hf_parquet", files, path=str(root), id_column="video_id")
    p["audio"] = {**AUDIO, "keep_audio": False}
    doc = run(hf_parquet, tmp_path, "00000", p)
    by_id = {c["clip_id"]: c for c in doc["clips"]}
    first = Path(by_id[IDS[0]]["audio"])
    assert first.name == f"{IDS[0]}.flac" and by_id["garbage0001"]["status"] == "ok"
    import pyarrow.parquet as pq

    cell = pq.read_table(root / files[0], columns=["audio"]).column("audio")[0].as_py()
    assert first.read_bytes() == cell["bytes"]  # the row's own bytes, not re-encoded
    first.write_bytes(cell["bytes"][:100])  # cut as by a power loss before the sync
    again = run(hf_parquet, tmp_path, "00000", p)
    assert again["clips"] == doc["clips"] and first.read_bytes() == cell["bytes"]
    features = {
        "mel": defaults(SCHEMA["properties"]["mel"]),
        "audio": p["audio"],
        "shards": defaults(SCHEMA["properties"]["shards"]),
        "seed": 0,
    }
    shard = mel.run_chunk(
        str(tmp_path / "manifests/src/00000.json"),
        str(tmp_path / "sh"),
        str(tmp_path / "s.json"),
        features,
    )
    status = {c["clip_id"]: (c["status"], c.get("stage")) for c in shard["clips"]}
    assert status["garbage0001"] == ("rejected", "mel") and status[IDS[0]] == ("ok", "mel")


def test_webdataset_shards_and_video_archives_through_the_hub(tmp_path, shards, monkeypatch):
    clips = [
        {
            "key": f"video/clip{i}_00000{i}",
            "audio": encoded("mp4", 2.0, clip_freq(i), video=True),
            "ext": "mp4",
        }
        for i in range(2)
    ]
    targz = wds_shard(tmp_path / "vgg_00.tar.gz", clips, mode="w:gz")
    files = {
        f"wds/shard-00000{i}.tar": (shards / f"shard-00000{i}.tar").read_bytes() for i in range(2)
    }
    files["video/vgg_00.tar.gz"] = targz.read_bytes()
    with Hub() as hub:
        hub.add("datasets", "me/mirror", files)
        for key, value in hub.env(tmp_path / "hf-home").items():
            monkeypatch.setenv(key, value)
        tar_urls = remote.expand(
            [f"hf://datasets/me/mirror@{Hub.SHA}/wds/shard-{{000000..000001}}.tar"]
        )
        video_urls = remote.expand(["hf://datasets/me/mirror/video/*.tar.gz"], tmp_path / "cache")
        assert video_urls == ["hf://datasets/me/mirror@main/video/vgg_00.tar.gz"]
        tars_doc = run(
            tars, tmp_path / "t", "00000", params("webdataset", tar_urls, label_field="labels")
        )
        video_doc = run(
            tars,
            tmp_path / "v",
            "00000",
            params("webdataset", video_urls, json="ignore", id_regex="([^/]+)$"),
        )
        listed = hub.hits["api/datasets/me/mirror/tree/main"]
        remote.expand(["hf://datasets/me/mirror/video/*.tar.gz"], tmp_path / "cache")
        assert hub.hits["api/datasets/me/mirror/tree/main"] == listed  # the listing is cached
    assert [c["clip_id"] for c in tars_doc["clips"] if c["status"] == "ok"] == ["a0", "a2", "b0"]
    assert tars_doc["clips"][-1]["reason"].startswith("duplicate: key 'a0' was already in ")
    assert [c["clip_id"] for c in video_doc["clips"]] == ["clip0_000000", "clip1_000001"]
    assert video_doc["summary"]["ok"] == 2
    assert not list((tmp_path / "t/dl").rglob("*.tar")) and not list(
        (tmp_path / "v/dl").rglob("*.tar.gz")
    )
