"""`--profile slurm` against a real single-node SLURM (slurmctld + slurmd + munge, brought up by
scripts/slurm_local.sh): a small demo DAG (data, training, evaluation) runs through sbatch and
gives the same outputs as a local run of the same config; the training rule's multi-node GPU
request reaches sbatch as intended.

Needs root and apt-get (or SLURM already installed); skips with a message otherwise. The
cluster is started by a module fixture and stopped afterwards unless it was already running.
"""

from __future__ import annotations

import csv
import filecmp
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from helpers import REPO, SLURM_CONF_AT_START, snakemake_env

pytestmark = pytest.mark.slow

SCRIPT = REPO / "scripts" / "slurm_local.sh"
PROFILE = REPO / "slurm" / "config.yaml"
RUN_TIMEOUT_S = 420  # one Snakemake run through SLURM (about 2-3 minutes on 2 cores)

# About the smallest DAG that still has every stage: 3 chunks of demo audio → 3 shards → dataset
# manifest → 1 epoch of the tiny MAE on 1 CPU worker → one small demo task, trained encoder and
# log-mel baseline, probe and k-NN → tables and plots (18 SLURM jobs).
CONFIG = {
    "sources": {
        "demo": {"type": "demo", "clips": 8, "chunk_size": 4, "min_s": 2.0, "max_s": 6.0},
        "demo_valid": {
            "type": "demo",
            "stream": 1000,
            "clips": 4,
            "chunk_size": 4,
            "min_s": 2.0,
            "max_s": 6.0,
        },
    },
    "training": {
        "size": "tiny",
        "epochs": 1,
        "batches_per_epoch": 2,
        "global_batch": 4,
        "warmup_epochs": 1,
        "validation_sources": ["demo_valid"],
        "validation_rows": 4,
        "workers": 1,
        "cpus_per_worker": 1,
        "use_gpu": False,
        "gpus_per_node": 0,
        "nodes": 1,
        "loader_workers": 0,
        "shuffle_buffer": 8,
        "object_store_mb": 128,
        "keep_best": 1,
        "average_best": 1,
        "mem_mb": 3000,
        "runtime_min": 15,
    },
    "evaluation": {
        "demo_tasks": {"tasks": ["demo_noise"], "speech": False, "scale": 0.2},
        "probe": {"hidden_layers": [1], "grid_points": 1, "max_epochs": 10, "patience": 2},
    },
    "models": {"trained": {"type": "checkpoint"}, "logmel": {"type": "logmel"}},
}

# The training rule's request for 2 nodes with 2 GPUs each, 4 workers of 3 CPUs.
GPU_TRAINING = {
    "nodes": 2,
    "workers": 4,
    "cpus_per_worker": 3,
    "use_gpu": True,
    "gpus_per_node": 2,
    "mem_mb": 5000,
    "runtime_min": 7,
}


def _script(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def slurm_cluster():
    """A running single-node cluster; yields its default partition. Its tests see the real SLURM
    config (the rest of the suite points the SLURM client nowhere: see helpers.py)."""
    with pytest.MonkeyPatch.context() as mp:
        if SLURM_CONF_AT_START is None:
            mp.delenv("SLURM_CONF", raising=False)
        else:
            mp.setenv("SLURM_CONF", SLURM_CONF_AT_START)
        if not sys.platform.startswith("linux"):
            pytest.skip("the local SLURM cluster needs Linux")
        if os.geteuid() != 0:
            pytest.skip(
                "bringing up a local SLURM cluster needs root (scripts/slurm_local.sh start)"
            )
        if not shutil.which("sbatch") and not shutil.which("apt-get"):
            pytest.skip(
                "SLURM is not installed and apt-get is not available to install slurm-wlm and munge"
            )
        was_up = _script("status", timeout=60).returncode == 0
        start = time.monotonic()
        proc = _script("start")
        if proc.returncode == 3:
            pytest.skip(
                f"a local SLURM cluster cannot be set up here: {proc.stderr.strip()[-500:]}"
            )
        assert proc.returncode == 0, (
            f"scripts/slurm_local.sh start failed:\n{proc.stdout}\n{proc.stderr}"
        )
        print(f"\nSLURM up in {time.monotonic() - start:.1f} s\n{proc.stdout}")
        partitions = subprocess.run(
            ["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, check=True
        ).stdout
        default = next(
            (p.rstrip("*") for p in partitions.split() if p.endswith("*")), partitions.split()[0]
        )
        try:
            yield default
        finally:
            if not was_up:
                stop = _script("stop", timeout=180)
                print(stop.stdout, stop.stderr)


def test_profile_defines_what_a_cluster_needs():
    """The committed profile: what each site edits is there, and the two traps are handled."""
    profile = yaml.safe_load(PROFILE.read_text())
    assert profile["executor"] == "slurm"
    assert profile["slurm-status-command"] == "squeue"  # sacct fails without an accounting database
    assert {"slurm_partition", "slurm_account", "runtime", "mem_mb", "cpus_per_task"} <= set(
        profile["default-resources"]
    )
    train = profile["set-resources"]["train"]
    assert (
        train["tasks_per_gpu"] == 0
    )  # no --ntasks-per-gpu (G tasks per node of all the node's CPUs)
    assert not {"nodes", "gres", "mem_mb", "runtime", "cpus_per_task"} & set(
        train
    )  # these come from the config
    # every entry is commented (on its line or on the line above)
    previous = ""
    for line in PROFILE.read_text().splitlines():
        if re.match(r"^\s*[a-z_-]+:", line):
            assert "#" in line or previous.lstrip().startswith("#"), (
                f"uncommented profile entry: {line}"
            )
        previous = line if line.strip() else previous


def derived_profile(folder: Path, partition: str, prefix: str) -> Path:
    """slurm/config.yaml as `scripts/slurm_local.sh profile` derives it for this cluster (its
    partition, no account), plus two test-only changes: a unique job-name prefix (to find and
    cancel our jobs) and a shorter first status poll (the DAG is many short jobs in a row)."""
    proc = _script("profile", str(folder), timeout=60)
    assert proc.returncode == 0, proc.stderr
    profile = yaml.safe_load((folder / "config.yaml").read_text())
    committed = yaml.safe_load(PROFILE.read_text())
    assert profile["default-resources"]["slurm_partition"] == partition
    assert profile["set-resources"]["train"]["slurm_partition"] == partition
    assert (
        "slurm_account" not in profile["default-resources"] and profile["slurm-no-account"] is True
    )
    for d in (profile, committed):  # nothing else changed
        d["default-resources"].pop("slurm_partition")
        d["default-resources"].pop("slurm_account", None)
        d["set-resources"]["train"].pop("slurm_partition")
    assert {k: v for k, v in profile.items() if k != "slurm-no-account"} == committed
    profile = yaml.safe_load((folder / "config.yaml").read_text())
    profile["slurm-jobname-prefix"] = prefix
    profile["slurm-init-seconds-before-status-checks"] = 10  # most jobs here take 5-10 s
    (folder / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return folder


def our_jobs(prefix: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True).stdout
    return [
        line.split()[0]
        for line in out.splitlines()
        if line.split()[1:2] and line.split()[1].startswith(prefix)
    ]


def cancel_jobs(prefix: str) -> None:
    jobs = our_jobs(prefix)
    if jobs:
        subprocess.run(["scancel", *jobs], capture_output=True)


def run_snakemake(
    workdir: Path,
    config: dict,
    *args: str,
    prefix: str | None = None,
    label: str = "all",
    timeout: int = RUN_TIMEOUT_S,
) -> tuple[int, str]:
    """Run the workflow (in its own process group, output to a file); never hangs: after `timeout`
    s the whole group gets SIGKILL (a stuck Snakemake ignores SIGTERM) and the SLURM jobs whose
    name starts with `prefix` are scancel'ed. Returns the exit status and the output."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / f"test-config-{label}.yaml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=True))
    log = workdir / f"snakemake-{label}.log"
    # SLURM jobs inherit this environment (sbatch --export=ALL). Ray's socket paths must stay short.
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    env = snakemake_env(DASHENG_RAY_TMP=ray_tmp)
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "-d",
        str(workdir),
        "--configfile",
        str(cfg),
        *args,
    ]
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            cmd, cwd=workdir, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if prefix:
                cancel_jobs(prefix)
            queue = (
                subprocess.run(["squeue"], capture_output=True, text=True).stdout if prefix else ""
            )
            raise AssertionError(
                f"{' '.join(cmd[2:])} did not finish in {timeout} s (killed):\n"
                f"{log.read_text()[-6000:]}\n{queue}"
            ) from None
        finally:
            if prefix:
                cancel_jobs(prefix)
            shutil.rmtree(ray_tmp, ignore_errors=True)
    return rc, log.read_text()


def files_under(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def slurmctld_log() -> str:
    config = subprocess.run(
        ["scontrol", "show", "config"], capture_output=True, text=True, check=True
    ).stdout
    path = re.search(r"^SlurmctldLogFile\s*=\s*(\S+)", config, re.M).group(1)
    return Path(path).read_text(errors="replace")


def test_demo_dag_through_slurm_equals_a_local_run(slurm_cluster, tmp_path):
    partition = slurm_cluster
    prefix = f"dashengtest{os.getpid()}"
    profile = derived_profile(tmp_path / "profile", partition, prefix)

    t0 = time.monotonic()
    local = tmp_path / "local"
    rc, local_out = run_snakemake(local, CONFIG, "--cores", "2", "all")
    assert rc == 0, f"the local run failed ({rc}):\n{local_out[-8000:]}"
    t1 = time.monotonic()
    remote = tmp_path / "slurm"
    rc, out = run_snakemake(remote, CONFIG, "--profile", str(profile), "all", prefix=prefix)
    t2 = time.monotonic()
    print(f"local run {t1 - t0:.0f} s, SLURM run {t2 - t1:.0f} s")
    assert rc == 0, f"snakemake --profile slurm failed ({rc}):\n{out[-8000:]}"

    # (a) every job went through sbatch and SLURM ran it to completion
    local_rules = sorted(re.findall(r"Finished jobid: \d+ \(Rule: (\w+)\)", local_out))
    submitted = re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", out)
    assert len(submitted) == len(local_rules) - 1 >= 15, out[
        -4000:
    ]  # all jobs but the target rule `all`
    rule_of = dict(re.findall(r"Finished jobid: (\d+) \(Rule: (\w+)\)", out))
    assert sorted([rule_of[j] for j, _ in submitted] + ["all"]) == local_rules
    # No accounting database here: sacct fails (with it, the plugin's default status command would
    # lose track of the jobs and Snakemake would wait forever); the profile's squeue was used.
    assert subprocess.run(["sacct", "-n"], capture_output=True).returncode != 0
    assert "Falling back to 'sacct'" not in out
    ctld = slurmctld_log()
    for _, slurm_id in submitted:
        assert re.search(rf"_job_complete: JobId={slurm_id} WEXITSTATUS 0\b", ctld), (
            f"SLURM job {slurm_id}"
        )
    assert our_jobs(prefix) == []

    # (b) the same outputs as the local run
    a, b = local / "results/demo", remote / "results/demo"
    for stage in ("manifests", "shards", "dataset", "audio"):
        fa, fb = files_under(a / stage), files_under(b / stage)
        assert fa.keys() == fb.keys() and fa, stage
        for name in fa:
            assert filecmp.cmp(fa[name], fb[name], shallow=False), f"{stage}/{name} differs"
    for name in ("encoder.safetensors", "encoder.json"):  # the same weights, metadata and sha256
        assert filecmp.cmp(a / "training" / name, b / "training" / name, shallow=False), name
    assert read_csv(a / "training/metrics.csv") == read_csv(b / "training/metrics.csv")
    for kind in ("probe", "knn"):
        fa, fb = files_under(a / "eval" / kind), files_under(b / "eval" / kind)
        assert fa.keys() == fb.keys() and len(fa) == 2, kind
        for name in fa:
            ja, jb = json.loads(fa[name].read_text()), json.loads(fb[name].read_text())
            assert ja["metrics"] == jb["metrics"], f"{kind}/{name}"
    score = lambda rows: [
        (r["model"], r["task"], r["method"], r["metric"], r["score"], r["std"]) for r in rows
    ]
    assert score(read_csv(a / "eval/results/scores.csv")) == score(
        read_csv(b / "eval/results/scores.csv")
    )
    for png in ("domains", "tasks", "loss_curve"):
        assert (b / f"eval/plots/{png}.png").stat().st_size > 0

    # (c) the training rule's multi-node GPU request, as sbatch gets it: 2 nodes, 2 GPUs and
    # workers/nodes x cpus_per_worker = 6 CPUs per node, one task; no --ntasks-per-gpu. This
    # one-node cluster without GPUs rejects it: the call is in the error message.
    gpu_config = {**CONFIG, "training": {**CONFIG["training"], **GPU_TRAINING}}
    rc, out = run_snakemake(
        remote,
        gpu_config,
        "--profile",
        str(profile),
        "train",
        prefix=prefix,
        label="gpu",
        timeout=120,
    )
    assert rc != 0
    call = re.search(
        r"SLURM sbatch failed\. The error message was '(sbatch: error: [^']*)'.\s*sbatch call:\s*(sbatch [^\n]*)",
        out,
    )
    assert call, out[-4000:]
    sbatch = call.group(2)
    for flag in (
        "--nodes=2",
        "--gres=gpu:2",
        "--cpus-per-task=6",
        "--mem 5000",
        "-t 7",
        f"-p {partition}",
    ):
        assert re.search(rf"(^|\s){re.escape(flag)}(\s|$)", sbatch), (flag, sbatch)
    assert "--ntasks-per-gpu" not in sbatch and "--ntasks" not in sbatch.split("--wrap")[0]


# A training that needs several SLURM jobs: each job may run 1 minute and SLURM warns it (SIGURG) 5 s
# before its limit; the job writes a step checkpoint, exits with status 75, and Snakemake resubmits it
# (retries from total_runtime_min / runtime_min) until it finishes. A 1-minute job trains for at most
# about 40 s: about 30 s go to starting Snakemake and Ray inside it, and the warning comes 5-35 s
# before the limit (slurmctld checks limits every 30 s). On the 2-core machine (about 5 steps/s) jobs
# trained 1-230 steps each; 700 steps (about 140 s of training) need at least three jobs even on a
# machine half again as fast. 30 minutes of budget: up to 29 resubmissions.
LONG_TRAINING = {
    **CONFIG["training"],
    "epochs": 1,
    "batches_per_epoch": 700,
    "runtime_min": 1,
    "total_runtime_min": 30,
    "signal_lead_s": 5,
    "checkpoint_every_min": 0.25,
}
TRAINING_OUTPUTS = [
    f"results/demo/training/{name}"
    for name in (
        "encoder.safetensors",
        "encoder.json",
        "metrics.csv",
        "summary.json",
        "loss_curve.png",
    )
]


def test_a_training_longer_than_the_time_limit_continues_over_jobs(slurm_cluster, tmp_path):
    """The demo's training with a 1-minute limit per job goes through several SLURM jobs (warning
    signal, step checkpoint, exit 75, resubmission, resume) and ends bit-identical to one
    uninterrupted local run of the same config."""
    partition = slurm_cluster
    prefix = f"dashenglong{os.getpid()}"
    profile = derived_profile(tmp_path / "profile", partition, prefix)
    settings = yaml.safe_load((profile / "config.yaml").read_text())
    settings["slurm-init-seconds-before-status-checks"] = (
        5  # see a finished job soon: the next one waits
    )
    (profile / "config.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    config = {**CONFIG, "training": LONG_TRAINING, "evaluation": {"enabled": False}}
    remote, local = tmp_path / "slurm", tmp_path / "local"
    rc, out = run_snakemake(
        remote, config, "--cores", "2", "results/demo/dataset/manifest.json", label="data"
    )
    assert rc == 0, out[-6000:]
    shutil.copytree(remote, local, ignore=shutil.ignore_patterns(".snakemake"))
    # the uninterrupted local run and the chain of SLURM jobs side by side (one CPU each), to halve the wall time
    with ThreadPoolExecutor(2) as pool:
        local_run = pool.submit(
            run_snakemake,
            local,
            config,
            "--cores",
            "1",
            *TRAINING_OUTPUTS,
            label="local",
            timeout=1200,
        )
        rc, out = run_snakemake(
            remote,
            config,
            "--profile",
            str(profile),
            *TRAINING_OUTPUTS,
            prefix=prefix,
            label="long",
            timeout=1500,
        )
        local_rc, local_out = local_run.result()
    print(out[-3000:])
    assert local_rc == 0, f"the local run failed ({local_rc}):\n{local_out[-6000:]}"
    assert rc == 0, f"snakemake --profile slurm failed ({rc}):\n{out[-8000:]}"

    # several SLURM jobs: each stopped at SLURM's warning with a step checkpoint, the last finished
    jobs = [
        slurm_id
        for _, slurm_id in re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", out)
    ]
    [attempts_file] = (remote / "results/demo/training_state").glob("mae-*/attempts.jsonl")
    attempts = [json.loads(line) for line in attempts_file.read_text().splitlines()]
    print("SLURM jobs", jobs, "\nattempts", "\n".join(map(json.dumps, attempts)))
    assert (
        len(jobs) >= 3
        and attempts[-1]["slurm_job"] == jobs[-1]
        and attempts[-1]["outcome"] == "finished"
    )
    # (a job killed at its limit before it could stop, on a busy machine, records no line: the next
    # one resumes from the last timed step checkpoint instead)
    assert len(attempts) >= 3 and {a["slurm_job"] for a in attempts} <= set(jobs)
    # one training run per SLURM job: the job's own Snakemake does not restart a stopped training
    assert len({a["slurm_job"] for a in attempts}) == len(attempts), "a job ran the training twice"
    assert all(a["outcome"] == "stopped" and a["signal"] == "SIGURG" for a in attempts[:-1])
    assert all(a["resumed_from"] == "step checkpoint" and a["start_step"] > 0 for a in attempts[1:])
    assert all(
        b["start_step"] >= a["end_step"]
        for a, b in zip(attempts, attempts[1:])
        if int(b["slurm_job"]) == int(a["slurm_job"]) + 1
    )  # each resumes where the last stopped
    # SLURM saw the stopped jobs fail (the training exits 75, Snakemake's job wrapper 1) and the last succeed
    ctld = slurmctld_log()
    for slurm_id in jobs[:-1]:
        assert not re.search(rf"_job_complete: JobId={slurm_id} WEXITSTATUS 0\b", ctld), (
            f"SLURM job {slurm_id}"
        )
    assert re.search(rf"_job_complete: JobId={jobs[-1]} WEXITSTATUS 0\b", ctld)

    # the same weights and loss curve as the uninterrupted local run
    for name in TRAINING_OUTPUTS:
        assert filecmp.cmp(local / name, remote / name, shallow=False), name
