"""`--profile slurm` against a real single-node SLURM (slurmctld + slurmd + munge, brought up by
scripts/slurm_local.sh): a training longer than SLURM's time limit goes on over several jobs and
equals a local run; the training rule's multi-node GPU request reaches sbatch as intended. (The
whole DAG through SLURM, equal to a local run: tests/test_slurm_multinode.py.)

Needs root and apt-get (or SLURM already installed); skips with a message otherwise. The
cluster is started by a module fixture and stopped afterwards unless it was already running.
"""

from __future__ import annotations

import filecmp
import json
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from slurm_util import (
    DEMO_CONFIG,
    PROFILE,
    Run,
    ctld_log_end,
    derived_profile,
    local_cluster,
    our_jobs,
    read_json,
    run_snakemake,
    slurmctld_log,
    submitted,
    train_workers,
    wait_for,
)

pytestmark = pytest.mark.slow

CONFIG = DEMO_CONFIG

# The training rule's request for 2 nodes with 2 GPUs each, 4 workers of 3 CPUs.
GPU_TRAINING = {
    "nodes": 2,
    "workers": 4,
    "cpus_per_worker": 3,
    "use_gpu": True,
    "gpus_per_node": 2,
    "mem_mb": 5000,
    "runtime_min": 7,
    "total_runtime_min": 7,  # (no resubmissions: the rejected request fails the run at once)
}


@pytest.fixture(scope="module")
def slurm_cluster():
    """A running single-node cluster (scripts/slurm_local.sh start --nodes 1); yields its default
    partition."""
    with local_cluster(1) as partition:
        yield partition


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


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    """The demo's data stages, run locally once: the trainings below start from a copy."""
    work = tmp_path_factory.mktemp("data")
    config = {**CONFIG, "evaluation": {"enabled": False}}
    rc, out = run_snakemake(
        work, config, "--cores", "2", "results/demo/dataset/manifest.json", label="data"
    )
    assert rc == 0, out[-6000:]
    return work


def copy_data(demo_data: Path, work: Path) -> Path:
    shutil.copytree(demo_data, work, ignore=shutil.ignore_patterns(".snakemake"))
    return work


def test_the_training_rules_multi_node_gpu_request_reaches_sbatch(
    slurm_cluster, demo_data, tmp_path
):
    """2 nodes, 2 GPUs and workers/nodes x cpus_per_worker = 6 CPUs per node, one task; no
    --ntasks-per-gpu. This one-node cluster without GPUs rejects it: the call is in the error.
    (The whole DAG through --profile slurm, equal to a local run: tests/test_slurm_multinode.py.)"""
    partition = slurm_cluster
    prefix = f"dashenggpu{os.getpid()}"
    profile = derived_profile(tmp_path / "profile", partition, prefix)
    gpu_config = {
        **CONFIG,
        "training": {**CONFIG["training"], **GPU_TRAINING},
        "evaluation": {"enabled": False},
    }
    work = copy_data(demo_data, tmp_path / "w")
    rc, out = run_snakemake(
        work,
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
    assert submitted(out) == [] and our_jobs(prefix) == []


# A training that needs several SLURM jobs, bounded by work: 60 steps in three jobs, whatever the
# machine's speed. Job 1 ends by SLURM's own time-limit warning: the test freezes its training worker
# (SIGSTOP) at step 10 or later, shortens the job's limit with `scontrol update` (as an admin would) so
# that it is within signal_lead_s, waits until the driver got SLURM's SIGURG and lets the worker go on:
# it finishes its step, writes a step checkpoint and the job exits with status 75. Job 2 is sent
# SIGURG with `scancel --signal=URG` once it has trained 15 steps more. Job 3 finishes. Snakemake
# resubmits after each stop (retries: total_runtime_min / runtime_min - 1 = 2).
CHAIN_TRAINING = {
    **CONFIG["training"],
    "epochs": 1,
    "batches_per_epoch": 60,
    "log_every": 1,  # (progress.json follows every step: the test acts at set steps)
    "runtime_min": 10,
    "total_runtime_min": 30,
    "signal_lead_s": 120,
    "checkpoint_every_min": 0,  # step checkpoints only when a job stops
}
FIRST_STOP, SECOND_STOP_AFTER = 10, 15
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


def _slurm_job(run: Run, n: int) -> str:
    """The SLURM id of the run's n-th submission (1-based), once Snakemake has submitted it."""
    jobs = submitted(run.output())
    return jobs[n - 1][1] if len(jobs) >= n else ""


def _progress(remote: Path) -> int:
    info = read_json(
        next((remote / "results/demo/training_state").glob("mae-*/progress.json"), Path("-"))
    )
    return info["step"] if info else 0


def _stop_by_the_time_limit(run: Run, remote: Path, job: str) -> None:
    """Freeze job ``job``'s training at step FIRST_STOP or later; make SLURM's time-limit warning due;
    let the training go on once the driver has it."""
    wait_for(
        f"job {job} at step {FIRST_STOP}", lambda: _progress(remote) >= FIRST_STOP, 600, run=run
    )
    workers = wait_for(f"the training worker of job {job}", lambda: train_workers(job), 60)
    for w in workers:
        w.suspend()
    try:
        show = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
        h, m, sec = (
            int(x) for x in re.search(r"RunTime=(?:\d+-)?(\d+):(\d+):(\d+)", show.stdout).groups()
        )
        limit = (
            h * 3600 + m * 60 + sec + CHAIN_TRAINING["signal_lead_s"] - 20
        )  # within the lead now
        subprocess.run(
            ["scontrol", "update", f"JobId={job}", f"TimeLimit={limit // 60}:{limit % 60:02d}"],
            check=True,
        )
        train_log = remote / "results/demo/logs/training/train.log"
        wait_for(
            "SLURM's warning (SIGURG) at the driver",
            lambda: "SIGURG received" in train_log.read_text(errors="replace"),
            120,  # slurmctld checks time limits every 30 s
            run=run,
        )
    finally:
        for w in workers:
            w.resume()


def test_a_training_longer_than_the_time_limit_continues_over_jobs(
    slurm_cluster, demo_data, tmp_path
):
    """The demo's training goes through three SLURM jobs (a stop by SLURM's time-limit warning, a
    stop by `scancel --signal=URG`, the end), each resuming where the last stopped (step checkpoint,
    exit 75, resubmission), and ends bit-identical to one uninterrupted local run of the same config."""
    partition = slurm_cluster
    prefix = f"dashenglong{os.getpid()}"
    log_start = ctld_log_end()
    profile = derived_profile(
        tmp_path / "profile",
        partition,
        prefix,
        **{"slurm-init-seconds-before-status-checks": 5},  # see a stopped job soon
    )
    config = {**CONFIG, "training": CHAIN_TRAINING, "evaluation": {"enabled": False}}
    remote = copy_data(demo_data, tmp_path / "slurm")
    local = copy_data(demo_data, tmp_path / "local")
    # the uninterrupted local run beside the chain of SLURM jobs
    with ThreadPoolExecutor(1) as pool:
        local_run = pool.submit(
            run_snakemake,
            local,
            config,
            "--cores",
            "1",
            *TRAINING_OUTPUTS,
            label="local",
            timeout=900,
        )
        run = Run(
            remote,
            config,
            "--profile",
            str(profile),
            *TRAINING_OUTPUTS,
            prefix=prefix,
            label="long",
        )
        try:
            job1 = wait_for("the first training job", lambda: _slurm_job(run, 1), 120, run=run)
            _stop_by_the_time_limit(run, remote, job1)
            job2 = wait_for("the second training job", lambda: _slurm_job(run, 2), 300, run=run)
            first = json.loads(
                next(remote.glob("results/demo/training_state/mae-*/attempts.jsonl"))
                .read_text()
                .splitlines()[0]
            )
            wait_for(
                f"job {job2} at step {first['end_step'] + SECOND_STOP_AFTER}",
                lambda: _progress(remote) >= first["end_step"] + SECOND_STOP_AFTER,
                600,
                run=run,
            )
            subprocess.run(["scancel", "--signal=URG", job2], check=True)
            rc, out = run.finish(900)
        finally:
            if run.proc.poll() is None:
                run.kill()
            run.cleanup()
        local_rc, local_out = local_run.result()
    print(out[-3000:])
    assert local_rc == 0, f"the local run failed ({local_rc}):\n{local_out[-6000:]}"
    assert rc == 0, f"snakemake --profile slurm failed ({rc}):\n{out[-8000:]}"

    # three SLURM jobs: stopped by the time-limit warning, stopped by scancel, finished
    jobs = [slurm_id for _, slurm_id in submitted(out)]
    [attempts_file] = (remote / "results/demo/training_state").glob("mae-*/attempts.jsonl")
    attempts = [json.loads(line) for line in attempts_file.read_text().splitlines()]
    print("SLURM jobs", jobs, "\nattempts", "\n".join(map(json.dumps, attempts)))
    assert len(jobs) == 3 and jobs[0] == job1 and jobs[1] == job2
    s1, s2 = attempts[0]["end_step"], attempts[1]["end_step"]
    assert [
        (
            a["slurm_job"],
            a["outcome"],
            a["resumed_from"],
            a["start_step"],
            a["end_step"],
            a["signal"],
        )
        for a in attempts
    ] == [
        (jobs[0], "stopped", "start", 0, s1, "SIGURG"),
        (jobs[1], "stopped", "step checkpoint", s1, s2, "SIGURG"),
        (jobs[2], "finished", "step checkpoint", s2, None, None),
    ]
    assert FIRST_STOP < s1 < s2 - SECOND_STOP_AFTER < 60 - SECOND_STOP_AFTER, (s1, s2)
    # SLURM saw the stopped jobs fail (the training exits 75, Snakemake's job wrapper 1), the last
    # succeed, and none reach its time limit (the warning came in time)
    ctld = slurmctld_log(log_start)
    for slurm_id in jobs[:-1]:
        assert re.search(rf"_job_complete: JobId={slurm_id} WEXITSTATUS [1-9]", ctld), slurm_id
    assert re.search(rf"_job_complete: JobId={jobs[-1]} WEXITSTATUS 0\b", ctld)
    assert not any(f"Time limit exhausted for JobId={j}" in ctld for j in jobs)

    # the same weights and loss curve as the uninterrupted local run
    for name in TRAINING_OUTPUTS:
        assert filecmp.cmp(local / name, remote / name, shallow=False), name
