"""The data stage through real Snakemake runs on small configs."""

import shutil

import numpy as np
import pytest
import torch
from helpers import bad_corpus, read_json, snakemake, tone
from loopback import File, Status

from dasheng_model.frontend import LogMel
from dasheng_pipeline.common import audio
from dasheng_pipeline.features import shards

pytestmark = pytest.mark.slow

DEMO = {
    "sources": {"demo": {"type": "demo", "clips": 9, "chunk_size": 4, "min_s": 1.0, "max_s": 13.0}}
}
DATASET = "results/demo/dataset/manifest.json"


def test_demo_source_to_shards(tmp_path):
    snakemake(tmp_path, DEMO, "data")
    out = tmp_path / "results/demo"
    dataset = read_json(out / "dataset/manifest.json")
    assert [s["chunk"] for s in dataset["shards"]] == ["00000", "00001", "00002"]
    assert dataset["totals"]["clips"] == 9 and dataset["totals"]["ok"] == 9
    assert dataset["mel"]["n_mels"] == 64 and len(dataset["stats"]["mean"]) == 64
    for shard in dataset["shards"]:
        shards.verify(tmp_path / shard["path"], shard["sha256"])
        assert shard["path"] == f"results/demo/shards/demo/{shard['chunk']}/part-000.parquet"
    # mel values against a direct torchaudio computation on the stored 16 kHz audio
    fetch = read_json(out / "manifests/demo/00000.json")
    first = fetch["clips"][0]
    samples = audio.decode(tmp_path / first["audio"])
    direct = LogMel()(torch.from_numpy(samples[:160000])[None])[0].numpy()
    batch = next(
        shards.iter_batches(
            out / "shards/demo/00000/part-000.parquet",
            8,
            ("clip_id", "window", "valid_frames", "mel", "labels"),
        )
    )
    assert batch["clip_id"][0] == first["clip_id"] and batch["window"][0] == 0
    valid = int(batch["valid_frames"][0])
    assert valid == min(samples.size, 160000) // 160 + 1
    np.testing.assert_allclose(
        batch["mel"][0][:, :valid].astype(np.float32), direct[:, :valid], atol=0.07
    )
    assert batch["labels"][0] == first["labels"]
    meta = shards.read_meta(out / "shards/demo/00000/part-000.parquet")
    assert set(meta["provenance"]) == {"config_hash", "seed", "versions", "git_sha"}
    assert meta["mel"]["top_db"] == 120.0
    # clips of more than 10 s have several windows
    shard_manifest = read_json(out / "shards/demo/00000.json")
    assert sum(c["windows"] for c in shard_manifest["clips"]) == shard_manifest["rows"]
    assert "ok 4 / failed 0 / rejected 0" in (out / "logs/features/demo/00000.log").read_text()


def test_rerun_after_deleting_one_chunk_redoes_only_that_chunk(tmp_path):
    snakemake(tmp_path, DEMO, "data")
    out = tmp_path / "results/demo"
    before = {
        p: p.stat().st_mtime_ns
        for p in out.glob("shards/demo/**/*")
        if p.is_file() and p.name[0] != "."
    }
    shutil.rmtree(out / "shards/demo/00001")
    proc = snakemake(tmp_path, DEMO, "data")
    assert "mel_chunk" in proc.stdout + proc.stderr
    after = {
        p: p.stat().st_mtime_ns
        for p in out.glob("shards/demo/**/*")
        if p.is_file() and p.name[0] != "."
    }
    changed = sorted(str(p.relative_to(out)) for p in after if after[p] != before.get(p))
    assert changed == ["shards/demo/00001.json", "shards/demo/00001/part-000.parquet"]
    log = proc.stdout + proc.stderr
    assert "demo_chunk" not in log  # the audio of chunk 1 was not regenerated
    # Deleting a chunk's audio manifest redoes that chunk's audio and shard, nothing else.
    before = after
    (out / "manifests/demo/00002.json").unlink()
    proc = snakemake(tmp_path, DEMO, "data")
    after = {
        p: p.stat().st_mtime_ns
        for p in out.glob("shards/demo/**/*")
        if p.is_file() and p.name[0] != "."
    }
    changed = sorted(str(p.relative_to(out)) for p in after if after[p] != before.get(p))
    assert changed == ["shards/demo/00002.json", "shards/demo/00002/part-000.parquet"]
    assert (proc.stdout + proc.stderr).count("rule demo_chunk") == 1


def test_local_folder_with_bad_files(tmp_path):
    corpus = tmp_path / "corpus"
    expected = bad_corpus(corpus)
    config = {
        "sources": {"mine": {"type": "local", "root": str(corpus), "chunk_size": 6}},
        "audio": {"max_duration_s": 20},
    }
    snakemake(tmp_path, config, "data")
    out = tmp_path / "results/demo"
    rejects = {r["clip_id"]: r for r in read_json(out / "dataset/rejects.json")["rejects"]}
    for rel, want in expected.items():
        if want == "ok":
            assert rel not in rejects
        else:
            assert rejects[rel]["reason"].startswith(want), (rel, rejects[rel])
    index = read_json(out / "lists/mine.files.json")
    assert index["ignored"] == ["notes.txt"]
    dataset = read_json(out / "dataset/manifest.json")
    assert dataset["totals"] == {
        **dataset["totals"],
        "clips": 11,
        "ok": 3,
        "rejected": 8,
        "failed": 0,
    }
    # sorted order: chunk 0 = six bad/ files, chunk 1 = two bad/ and three good/ files
    second = read_json(out / "manifests/mine/00001.json")["clips"]
    long = next(c for c in second if c["clip_id"] == "good/long.flac")
    assert long["note"] == "truncated to audio.max_duration_s=20 s"
    logs = [(out / f"logs/sources/mine/0000{i}.log").read_text() for i in (0, 1)]
    assert "ok 0 / failed 0 / rejected 6" in logs[0] and "ok 3 / failed 0 / rejected 2" in logs[1]


def test_local_source_streams_originals_without_keep_audio(tmp_path):
    corpus = tmp_path / "corpus"
    tone(corpus / "x" / "a.wav", 12.0, sample_rate=48000)
    tone(corpus / "x" / "b.mp3", 3.0)
    config = {
        "sources": {"raw": {"type": "local", "root": str(corpus), "labels": "folder"}},
        "audio": {"keep_audio": False},
    }
    snakemake(tmp_path, config, "data")
    out = tmp_path / "results/demo"
    assert not (out / "audio").exists()
    batch = next(
        shards.iter_batches(
            out / "shards/raw/00000/part-000.parquet",
            8,
            ("clip_id", "window", "valid_frames", "labels"),
        )
    )
    assert batch["clip_id"] == ["x/a.wav", "x/a.wav", "x/b.mp3"]
    assert list(batch["window"]) == [0, 1, 0] and list(batch["valid_frames"]) == [1001, 201, 301]
    assert batch["labels"] == [["x"], ["x"], ["x"]]


def test_hear_fixture_as_a_local_source(tmp_path, hear_task):
    config = {
        "sources": {"digits": {"type": "local", "root": str(hear_task / "44100"), "chunk_size": 40}}
    }
    snakemake(tmp_path, config, "data")
    out = tmp_path / "results/demo"
    dataset = read_json(out / "dataset/manifest.json")
    n_files = sum(1 for _ in (hear_task / "44100").rglob("*.wav"))
    assert dataset["totals"]["ok"] + dataset["totals"]["rejected"] == n_files
    assert dataset["totals"]["windows"] == dataset["totals"]["ok"]  # 1 s clips: one window each
    assert len(dataset["shards"]) == -(-n_files // 40)
    fetch = read_json(out / "manifests/digits/00000.json")
    wav = hear_task / "44100" / fetch["clips"][0]["path"]
    direct = audio.decode(wav)
    assert direct.size == 16000  # 44.1 kHz, 1 s → 16 kHz
    batch = next(
        shards.iter_batches(
            out / "shards/digits/00000/part-000.parquet", 1, ("mel", "valid_frames")
        )
    )
    stored = audio.decode(tmp_path / fetch["clips"][0]["audio"])
    np.testing.assert_allclose(stored, direct, atol=1.5 / 32768)  # the 16-bit FLAC copy
    ref = LogMel()(torch.from_numpy(stored)[None])
    assert batch["valid_frames"][0] == 101
    np.testing.assert_allclose(
        batch["mel"][0][:, :101].astype(np.float32), ref[0].numpy(), atol=0.07
    )


def test_speech_commands_with_folder_labels_and_a_long_file(tmp_path, speech_commands):
    config = {
        "sources": {
            "spc": {
                "type": "local",
                "root": str(speech_commands),
                "labels": "folder",
                "chunk_size": 100,
            }
        }
    }
    snakemake(tmp_path, config, "data")
    out = tmp_path / "results/demo"
    rows = list(
        shards.iter_batches(
            out / "shards/spc/00000/part-000.parquet",
            1000,
            ("clip_id", "window", "labels", "valid_frames"),
        )
    )[0]
    noise = [i for i, c in enumerate(rows["clip_id"]) if c.startswith("_background_noise_/")]
    assert [rows["window"][i] for i in noise] == list(
        range(7)
    )  # 61 s: six 10 s windows and a 1 s tail
    assert rows["labels"][noise[0]] == ["_background_noise_"]
    yes = [rows["labels"][i] for i, c in enumerate(rows["clip_id"]) if c.startswith("yes/")]
    assert yes and all(lab == ["yes"] for lab in yes)
    index = read_json(out / "lists/spc.files.json")
    assert "README.md" in index["ignored"] and "testing_list.txt" in index["ignored"]


@pytest.mark.network
def test_youtube_source_through_snakemake(tmp_path, loopback):
    media = tone(tmp_path / "media/a.m4a", 30.0)
    loopback.routes.update(
        {
            "okAAAAAAAAA": File(media, "audio/mp4"),
            "okBBBBBBBBB": File(media, "audio/mp4"),
            "gone0000000": Status(404),
        }
    )
    listing = tmp_path / "segments.csv"
    listing.write_text(
        "# Segments csv created for a test\n# num_ytids=5\n# YTID, start_seconds, end_seconds, positive_labels\n"
        'okAAAAAAAAA, 5.000, 15.000, "/m/a"\ngone0000000, 0.000, 10.000, "/m/b"\n'
        'okBBBBBBBBB, 2.500, 12.500, "/m/a,/m/c"\nbad id!, 0, 10, "/m/x"\nokAAAAAAAAA, 5.000, 15.000, "/m/a"\n'
    )
    config = {
        "sources": {
            "as": {
                "type": "youtube",
                "list": str(listing),
                "format": "audioset",
                "chunk_size": 3,
                "url_template": loopback.url_template,
                "sleep_between_s": 0,
                "retries": 0,
                "socket_timeout_s": 5,
                "download_threads": 3,
            }
        }
    }
    snakemake(tmp_path, config, "data")
    out = tmp_path / "results/demo"
    clips = (
        read_json(out / "manifests/as/00000.json")["clips"]
        + read_json(out / "manifests/as/00001.json")["clips"]
    )
    assert [(c["clip_id"], c["status"]) for c in clips] == [
        ("okAAAAAAAAA_5000", "ok"),
        ("gone0000000_0", "failed"),
        ("okBBBBBBBBB_2500", "ok"),
        ("row3", "rejected"),
        ("okAAAAAAAAA_5000", "rejected"),
    ]
    assert clips[4]["reason"] == "duplicate of row 0 (same video and start)"
    dataset = read_json(out / "dataset/manifest.json")
    assert dataset["totals"]["windows"] == 2
    hits = dict(loopback.hits)
    # Retrying failures: only the failed ID is asked for again, successes come from the cache.
    loopback.routes["gone0000000"] = File(media, "audio/mp4")
    snakemake(tmp_path, config, "data", "--forcerun", "youtube_chunk")
    assert (
        loopback.hits["okAAAAAAAAA"] == hits["okAAAAAAAAA"]
        and loopback.hits["okBBBBBBBBB"] == hits["okBBBBBBBBB"]
    )
    assert loopback.hits["gone0000000"] > hits["gone0000000"]
    assert read_json(out / "dataset/manifest.json")["totals"]["windows"] == 3


def test_a_bad_config_key_fails_fast_naming_it(tmp_path):
    proc = snakemake(tmp_path, {**DEMO, "mel": {"n_mel": 64}}, "all", check=False)
    assert proc.returncode != 0
    assert (
        "Additional properties are not allowed ('n_mel' was unexpected)"
        in proc.stdout + proc.stderr
    )
    proc = snakemake(
        tmp_path, {"sources": {"x": {"type": "youtube", "list": "missing.csv"}}}, "all", check=False
    )
    assert (
        "config key sources.x.list: segment list 'missing.csv' not found"
        in proc.stdout + proc.stderr
    )


def test_portable_numerics_reach_every_job(tmp_path):
    """numerics: portable caps the CPU kernels in the jobs' environment; the shards record the
    kernels that computed them (on a CPU wider than AVX2 they would say AVX512 otherwise)."""
    snakemake(tmp_path, {**DEMO, "numerics": "portable"}, "data")
    meta = shards.read_meta(tmp_path / "results/demo/shards/demo/00000/part-000.parquet")
    assert meta["provenance"]["versions"]["cpu_kernels"] == "AVX2"
