"""The DAG as a user meets it: --until per stage, --forcerun of one stage, a change of the
windowing invalidating the shards and everything downstream but nothing upstream, and a large
list building its DAG with the expected jobs."""

import json
import re

import pytest
import yaml
from helpers import REPO, snakemake

from dasheng_pipeline import plan
from dasheng_pipeline.common.atomic import canonical_json

pytestmark = pytest.mark.slow

SMALL = {
    "sources": {
        "demo": {"type": "demo", "clips": 12, "chunk_size": 6, "min_s": 3.0, "max_s": 8.0},
        "demo_valid": {
            "type": "demo",
            "stream": 1000,
            "clips": 4,
            "chunk_size": 4,
            "min_s": 3.0,
            "max_s": 8.0,
        },
    },
    "training": {
        "size": "tiny",
        "epochs": 1,
        "batches_per_epoch": 2,
        "global_batch": 4,
        "warmup_epochs": 0,
        "validation_sources": ["demo_valid"],
        "validation_rows": 4,
        "workers": 1,
        "use_gpu": False,
        "cpus_per_worker": 1,
        "loader_workers": 0,
        "shuffle_buffer": 8,
        "log_every": 1,
        "average_best": 1,
        "object_store_mb": 128,
        "gpus_per_node": 0,
        "mem_mb": 4000,
        "runtime_min": 30,
    },
    "evaluation": {
        "demo_tasks": {"tasks": ["demo_noise"], "scale": 0.2, "speech": False},
        "probe": {"hidden_layers": [1], "grid_points": 1, "max_epochs": 6, "patience": 2},
    },
    "models": {"trained": {"type": "checkpoint"}, "logmel": {"type": "logmel"}},
}
STAGES = {  # --until target: the rules that may run (that stage and everything upstream)
    "demo_chunk": {"demo_chunk"},
    "mel_chunk": {"demo_chunk", "mel_chunk"},
    "dataset_manifest": {"demo_chunk", "mel_chunk", "dataset_manifest"},
    "train": {"demo_chunk", "mel_chunk", "dataset_manifest", "train"},
    "embed": {"demo_chunk", "mel_chunk", "dataset_manifest", "train", "demo_task", "embed"},
    "probe": {
        "demo_chunk",
        "mel_chunk",
        "dataset_manifest",
        "train",
        "demo_task",
        "embed",
        "probe",
    },
}


def planned(proc) -> dict[str, int]:
    """Rule → job count from a dry run's job stats table."""
    text = proc.stdout + proc.stderr
    if "Nothing to be done" in text:
        return {}
    table = text.split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M)}


def test_until_stops_after_each_stage(tmp_path):
    everything = planned(snakemake(tmp_path, SMALL, "-n", "all"))
    assert {
        "demo_chunk",
        "mel_chunk",
        "dataset_manifest",
        "train",
        "demo_task",
        "embed",
        "probe",
        "knn",
        "eval_results",
        "eval_plots",
    } <= set(everything)
    for rule, allowed in STAGES.items():
        # No explicit target with --until: Snakemake 9 mis-schedules `--until RULE all` (its issue 823).
        jobs = planned(snakemake(tmp_path, SMALL, "-n", "--until", rule))
        assert rule in jobs and set(jobs) <= allowed, (rule, jobs)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    work = tmp_path_factory.mktemp("dag")
    snakemake(work, SMALL, "all")
    return work


def test_a_finished_run_has_nothing_to_do(finished):
    assert planned(snakemake(finished, SMALL, "-n", "all")) == {}


def test_forcerun_of_one_stage_redoes_it_and_what_depends_on_it(finished):
    jobs = planned(snakemake(finished, SMALL, "-n", "--forcerun", "mel_chunk", "all"))
    assert jobs["mel_chunk"] == 3 and jobs["dataset_manifest"] == 1 and jobs["train"] == 1
    assert jobs["embed"] == 1  # the trained encoder's embeddings, not the log-mel baseline's
    assert "demo_chunk" not in jobs and "demo_task" not in jobs
    jobs = planned(snakemake(finished, SMALL, "-n", "--forcerun", "train", "all"))
    assert set(jobs) >= {"train", "embed", "probe", "knn", "eval_results"}
    assert not {"demo_chunk", "mel_chunk", "dataset_manifest", "demo_task"} & set(jobs)


def test_two_clean_runs_give_the_same_bytes_and_metrics(finished, tmp_path):
    import hashlib

    import pyarrow.parquet as pq
    from helpers import read_json

    snakemake(tmp_path, SMALL, "all")
    a, b = finished / "results/demo", tmp_path / "results/demo"
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    pattern = (
        "shards/**/*.parquet",
        "shards/*/*.json",
        "manifests/*/*.json",
        "dataset/*.json",
        "training/metrics.csv",
        "training/encoder.safetensors",
        "eval/results/scores.csv",
        "provenance.csv",
    )
    compared = 0
    for glob in pattern:
        for path in sorted(a.glob(glob)):
            assert digest(path) == digest(b / path.relative_to(a)), path.relative_to(a)
            compared += 1
    assert compared == 15  # 3 shards, 3 shard manifests, 3 audio manifests, 2 dataset files, 4 more
    # every artifact names its config hash, seed, versions and git SHA
    keys = {"config_hash", "seed", "versions", "git_sha"}
    for doc in (
        "dataset/manifest.json",
        "shards/demo/00000.json",
        "manifests/demo/00000.json",
        "training/summary.json",
        "training/encoder.json",
        "eval/results/summary.json",
    ):
        assert set(read_json(a / doc)["provenance"]) == keys, doc
    meta = json.loads(pq.read_schema(a / "shards/demo/00000/part-000.parquet").metadata[b"dasheng"])
    assert set(meta["provenance"]) == keys
    assert "config_hash,seed,git_sha,versions" in (a / "provenance.csv").read_text().splitlines()[
        0
    ].replace("artifact,", "")


def test_changed_windowing_invalidates_shards_and_downstream_only(finished):
    # The front end's own parameters are the model's (not config keys); the windowing is config.
    changed = {**SMALL, "mel": {"window_s": 5.0}}
    jobs = planned(snakemake(finished, changed, "-n", "all"))
    assert jobs["mel_chunk"] == 3 and jobs["dataset_manifest"] == 1 and jobs["train"] == 1
    assert "demo_chunk" not in jobs and "demo_task" not in jobs
    audio_manifest = finished / "results/demo/manifests/demo/00000.json"
    before = audio_manifest.stat().st_mtime_ns
    shard = finished / "results/demo/shards/demo/00000/part-000.parquet"
    old = shard.read_bytes()
    snakemake(finished, changed, "data")
    assert audio_manifest.stat().st_mtime_ns == before  # upstream untouched
    assert shard.read_bytes() != old  # the shards were rebuilt with the new windowing


def test_a_large_list_builds_its_dag_with_one_job_per_chunk(tmp_path):
    listing = tmp_path / "ids.txt"
    listing.write_bytes(b"".join(f"{i:011d}\n".encode() for i in range(200_000)))
    config = {
        "sources": {
            "big": {
                "type": "youtube",
                "list": str(listing),
                "format": "acav100m",
                "chunk_size": 40_000,
            }
        },
        "training": {"validation_sources": ["big"]},
        "evaluation": {"enabled": False},
    }
    jobs = planned(snakemake(tmp_path, config, "-n", "data"))
    assert jobs == {
        "youtube_index": 1,
        "youtube_chunk": 5,
        "mel_chunk": 5,
        "dataset_manifest": 1,
        "coverage": 1,
        "data": 1,
    }


def dry_run_jobs(proc) -> list[dict]:
    """The jobs of a `snakemake -n -p` run: rule, outputs, shell command."""
    jobs = []
    for line in (proc.stdout + proc.stderr).splitlines():
        if m := re.match(r"^(?:local)?rule (\w+):$", line):
            jobs.append({"rule": m.group(1), "output": [], "shell": ""})
        elif jobs and (m := re.match(r"^\s+output: (.*)$", line)):
            jobs[-1]["output"] = m.group(1).split(", ")
        elif jobs and line.startswith("Shell command: "):
            jobs[-1]["shell"] = line.removeprefix("Shell command: ")
    return jobs


def test_the_dag_runs_the_plan_of_the_demo_config(tmp_path, monkeypatch):
    """The plan of config/config.yaml (dasheng_pipeline.plan, as tests/common/test_plan.py
    checks it) is what Snakemake schedules: chunks, tasks x models x protocols, the training
    job's params, the model specs, the quick sets, the layer files and the targets."""
    demo = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    jobs = dry_run_jobs(snakemake(tmp_path, demo, "-n", "-p", "all"))
    made = lambda *rules: {o for j in jobs if j["rule"] in rules for o in j["output"]}  # noqa: E731
    outputs = made(*{j["rule"] for j in jobs})
    monkeypatch.chdir(tmp_path)
    p = plan.resolve(plan.read_config(tmp_path / "test-config.yaml"))
    ev = plan.resolve_evaluation(p, outputs.__contains__)
    out = p.out
    assert made("demo_chunk", "hf_parquet_chunk") == {  # the demo's validation clips' mirror too
        f"{out}/manifests/{n}/{c}.json" for n, s in p.sources.items() for c in s.chunks
    }
    assert set(ev.models) == {"trained", "random", "logmel"}
    assert {"demo_pitch", "demo_timbre", "demo_noise", "demo_events", "demo_noise_xares"} <= set(
        p.tasks
    )  # + the speech tasks where espeak-ng is installed
    assert made("embed") == {f"{out}/eval/embeddings/{m}/{t}" for m in ev.models for t in p.tasks}
    assert made("probe", "knn", "xares_protocol") == set(ev.result_files)
    assert made("layer_scores") == set(ev.layer_files) and ev.layer_files
    layers = {f"{out}/eval/quick/{t}.npz" for t in demo["evaluation"]["layers"]["tasks"]}
    assert made("quick_set") == set(p.training.quick_sets) | layers
    plots = {o for o in outputs if "/eval/plots/" in o}
    assert plots == {t for t in ev.targets if "/plots/" in t} and len(plots) == 5
    (train,) = [j for j in jobs if j["rule"] == "train"]
    assert f"--params '{canonical_json(p.training.params)}'" in train["shell"]
    (embed,) = [j for j in jobs if j["output"] == [f"{out}/eval/embeddings/random/demo_noise"]]
    assert f"--spec '{canonical_json(ev.specs['random'])}'" in embed["shell"]
