"""Many nodes on one machine: `--profile slurm` against a real SLURM cluster of three nodes
(`scripts/slurm_local.sh start --nodes 3`: slurmctld and three slurmd, each in its own network, UTS and
mount namespace on a bridge; the filesystem shared), with the training on two nodes: the Ray head on
one, a Ray worker started by `srun` on the other (workflow/scripts/ray_slurm.sh), one Ray Train worker
per node, DDP over gloo between the namespaces.

Every run ends with the outputs of a local run of the same config, in which both workers share one
node (same world size and rank order): bit for bit.

- Always (CI): the demo DAG through SLURM. Its data and evaluation jobs spread over the nodes; the
  training's node 2 is killed mid-epoch (kill -9 of every process in its namespace: slurmd, Ray,
  the worker): the driver notices, the job exits 75, Snakemake resubmits, the next job resumes from
  the last step checkpoint on two working nodes. The time this costs is measured.
- DASHENG_SLURM_MULTINODE=full adds: an uninterrupted two-node training; a training in which a worker
  hangs (SIGSTOP: Ray Train's health check declares it dead after training.hang_timeout_s and
  restarts the worker group from the step checkpoint, inside the job) and then the head node is lost
  (the whole job dies; SLURM ends it NODE_FAIL; the resubmission resumes).

The node-loss cases go into the fault table (tests/faults/figures.py; DASHENG_FAULT_FIGURES merges
them into docs/reliability/fault-figures.md). Needs root, iproute2 and SLURM (or apt-get to install
them); skips with a message elsewhere.
"""

from __future__ import annotations

import contextlib
import filecmp
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from faults.figures import Figures
from slurm_util import (
    DEMO_CONFIG,
    Run,
    allocations,
    ctld_log_end,
    ctld_time,
    derived_profile,
    files_under,
    local_cluster,
    read_csv,
    read_json,
    run_snakemake,
    script,
    slurmctld_log,
    train_workers,
    training_driver,
    wait_for,
)

from dasheng_pipeline.training.step_checkpoint import StepCheckpoints

pytestmark = pytest.mark.slow

FULL = os.environ.get("DASHENG_SLURM_MULTINODE", "") == "full"
full_only = pytest.mark.skipif(
    not FULL, reason="full size only (DASHENG_SLURM_MULTINODE=full): CI runs the smallest size"
)

NODES = 3
STEPS_PER_EPOCH = 24
TRAINING = {
    **DEMO_CONFIG["training"],
    "workers": 2,
    "nodes": 2,  # one worker per node (run locally, both share one node: nodes only places them)
    "cpus_per_worker": 1,
    "epochs": 2,
    "batches_per_epoch": STEPS_PER_EPOCH,
    "log_every": 1,  # (progress.json follows every step: the test acts at set steps)
    "mem_mb": 2000,
    "runtime_min": 15,
    "total_runtime_min": 60,  # up to 3 resubmissions
    "checkpoint_every_min": 0,  # step checkpoints when the test asks for one (SIGUSR2)
    "hang_timeout_s": 20,
    "max_failures": 3,
}
CONFIG = {**DEMO_CONFIG, "training": TRAINING}
TRAINING_OUTPUTS = [
    f"results/demo/training/{name}"
    for name in ("encoder.safetensors", "encoder.json", "metrics.csv", "summary.json")
]
DATA = ("manifests", "shards", "dataset", "audio")


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(NODES) as partition:
        yield partition


@pytest.fixture(scope="module")
def node_figures(tmp_path_factory):
    """The node-loss rows of the fault table (written at the end of the module)."""
    figs = Figures()
    yield figs
    if figs.rows:
        figs.write(tmp_path_factory.getbasetemp(), "fault-figures-nodes")
        figs.publish()
        print("\n" + figs.table())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The local run of the same DAG: one Ray node with both workers."""
    work = tmp_path_factory.mktemp("local")
    rc, out = run_snakemake(work, CONFIG, "--cores", "2", "all", label="local", timeout=900)
    assert rc == 0, f"the local run failed ({rc}):\n{out[-6000:]}"
    (work / "snakemake.out").write_text(out)
    return work


def profile_for(tmp_path: Path, partition: str) -> tuple[Path, str]:
    prefix = f"dashengmn{os.getpid()}{tmp_path.name[-6:]}"
    # (first status poll after 5 s: a stopped training job is seen soon)
    settings = {"slurm-init-seconds-before-status-checks": 5}
    return derived_profile(tmp_path / "profile", partition, prefix, **settings), prefix


def copy_data(reference: Path, work: Path) -> Path:
    for part in DATA:
        shutil.copytree(reference / "results/demo" / part, work / "results/demo" / part)
    return work


# ----------------------------------------------------------------------------- watching a training


class Training:
    """A SLURM run's training as the test sees it: its jobs, its state folder, its driver."""

    def __init__(self, run: Run, work: Path):
        self.run, self.work = run, work

    def jobs(self) -> list[str]:
        """SLURM ids of the training rule's submissions so far."""
        return re.findall(
            r"has been submitted with SLURM jobid (\d+) \(log: [^)]*rule_train", self.run.output()
        )

    def job(self, n: int, timeout: float = 600) -> str:
        """The n-th training job (1-based), once submitted."""
        jobs = wait_for(
            f"training job {n}",
            lambda: len(self.jobs()) >= n and self.jobs(),
            timeout,
            run=self.run,
        )
        return jobs[n - 1]

    def state(self) -> Path | None:
        return next(iter((self.work / "results/demo/training_state").glob("mae-*")), None)

    def file(self, name: str):
        state = self.state()
        return read_json(state / name) if state else None

    def progress(self) -> int:
        info = self.file("progress.json")
        return info["step"] if info else 0

    def at_step(self, step: int, timeout: float = 600) -> int:
        return wait_for(
            f"training at step {step}",
            lambda: self.progress() >= step and self.progress(),
            timeout,
            every=0.1,
            run=self.run,
        )

    def placement(self, job: str) -> list[dict]:
        """Each rank's host in job ``job`` (once its workers have started)."""

        def check():
            driver = training_driver(self.work, job)
            info = self.file("placement.json")
            return driver and info and info["ranks"]

        return wait_for(f"the workers of job {job}", check, 600, run=self.run)

    def checkpoint_now(self, job: str) -> int:
        """A step checkpoint on request (SIGUSR2 to the driver); its step."""
        before = self.newest_checkpoint()
        training_driver(self.work, job).send_signal(signal.SIGUSR2)
        return wait_for(
            "the requested step checkpoint",
            lambda: (self.newest_checkpoint() or 0) > (before or 0) and self.newest_checkpoint(),
            300,
            run=self.run,
        )

    def newest_checkpoint(self) -> int | None:
        """The step of the newest complete step checkpoint (the training's own rule)."""
        state = self.state()
        folders = StepCheckpoints(state).folders() if state else []
        return int(folders[0].name.split("-")[1]) if folders else None

    def attempts(self) -> list[dict]:
        state = self.state()
        path = state / "attempts.jsonl" if state else None
        if not path or not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def log(self) -> str:
        """The training log of the current (or last) job."""
        return (self.work / "results/demo/logs/training/train.log").read_text(errors="replace")

    def nodes(self) -> tuple[str, list[str]]:
        """The current job's Ray head node and worker nodes, as the launcher logged them."""
        m = re.search(r"ray_slurm: head (\S+) \(.*\), workers: (.*)", self.log())
        return m.group(1), m.group(2).split()


def ip_of(placement: list[dict], host: str) -> str:
    return next(r["ip"] for r in placement if r["host"] == host)


def node_state(node: str) -> str:
    out = subprocess.run(["sinfo", "-h", "-N", "-n", node, "-o", "%T"], capture_output=True)
    return out.stdout.decode().strip()


def restore_nodes() -> None:
    """Bring back every killed node (scripts/slurm_local.sh start is idempotent)."""
    proc = script("start")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def resumed_after(t: Training, since: float, timeout: float = 900) -> float:
    """The time of the first training step of workers started after ``since`` (a new job's, or a
    restarted worker group's: their rank 0 rewrites resume.json, then progress.json)."""

    def check():
        try:
            started = (t.state() / "resume.json").stat().st_mtime
            stepped = (t.state() / "progress.json").stat().st_mtime
        except (OSError, TypeError):
            return None
        return stepped if started > since and stepped > started else None

    return wait_for("the resumed training's first step", check, timeout, every=0.1, run=t.run)


def after_the_lost_node(run: Run, t: Training, node: str, t_kill: float) -> tuple[float, int, str]:
    """When the training resumed after ``node`` was killed at ``t_kill``; then, once SLURM marked
    the node DOWN, the node back (the next tests need three nodes; the resumed job runs already)
    and the run to its end: (resumed, rc, output)."""
    t_resumed = resumed_after(t, t_kill)
    wait_for(f"{node} DOWN in SLURM", lambda: "down" in node_state(node), 300)
    restore_nodes()
    rc, out = run.finish(1200)
    return t_resumed, rc, out


@contextlib.contextmanager
def nodes_restored(run: Run):
    """A test that stops early kills its run; the nodes come back in any case."""
    try:
        yield
    finally:
        if run.proc.poll() is None:
            run.kill()
        run.cleanup()
        restore_nodes()


def same_training(local: Path, remote: Path) -> None:
    """The remote training's encoder, sidecar, metrics and summary equal the local run's."""
    for name in TRAINING_OUTPUTS:
        assert filecmp.cmp(local / name, remote / name, shallow=False), f"{name} differs"


def kill_node(node: str) -> float:
    proc = script("kill-node", node, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(proc.stdout.strip())
    return time.time()


# ----------------------------------------------------------------------------- the tests


def test_the_dag_on_three_nodes_survives_a_lost_node_and_equals_a_local_run(
    cluster, reference, tmp_path, node_figures
):
    remote = tmp_path / "slurm"
    profile, prefix = profile_for(tmp_path, cluster)
    log_start = ctld_log_end()
    run = Run(remote, CONFIG, "--profile", str(profile), "all", prefix=prefix)
    t = Training(run, remote)
    with nodes_restored(run):
        job1 = t.job(1)
        first = t.placement(job1)
        at = t.at_step(6)
        saved = t.checkpoint_now(job1)
        killed_at = t.at_step(saved + 2)
        head, [victim] = t.nodes()  # a worker node (it holds one of the ranks), not the head
        t_kill = kill_node(victim)
        lost = wait_for(
            "the driver's record of the lost node",
            lambda: [a for a in t.attempts() if a["outcome"] == "node lost"],
            300,
            run=run,
        )[0]
        t_resumed, rc, out = after_the_lost_node(run, t, victim, t_kill)
    assert rc == 0, f"snakemake --profile slurm failed ({rc}):\n{out[-8000:]}"
    ctld = slurmctld_log(log_start)
    alloc = allocations(ctld)

    # (a) every job of the local run but the target `all` went through sbatch, the training twice;
    # with no accounting database here sacct fails (the plugin's default status command would then
    # lose track of the jobs and Snakemake would wait forever): the profile's squeue was used
    local_out = (reference / "snakemake.out").read_text()
    local_rules = sorted(re.findall(r"Finished jobid: \d+ \(Rule: (\w+)\)", local_out))
    rule_of = dict(re.findall(r"Finished jobid: (\d+) \(Rule: (\w+)\)", out))
    sent = re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", out)
    assert sorted({rule_of[j] for j, _ in sent} | {"all"}) == sorted(set(local_rules))
    assert len(sent) == len(local_rules) >= 16, out[-4000:]  # (less `all`, plus one resubmission)
    assert subprocess.run(["sacct", "-n"], capture_output=True).returncode != 0
    assert "Falling back to 'sacct'" not in out
    for _, slurm_id in sent:
        if slurm_id != job1:
            assert re.search(rf"_job_complete: JobId={slurm_id} WEXITSTATUS 0\b", ctld), slurm_id

    # the data and evaluation jobs spread over the nodes (SLURM's allocations: no sacct here)
    jobs = re.findall(r"SLURM jobid (\d+) \(log: [^)]*rule_(\w+)", out)
    table = sorted((rule, job, ",".join(alloc[job])) for job, rule in jobs)
    print("\n".join(f"{rule:24} {job:>5} {nodes}" for rule, job, nodes in table))
    data_rules = {"demo_chunk", "mel_chunk", "dataset_manifest"}
    data_nodes = {n for job, rule in jobs if rule in data_rules for n in alloc[job]}
    eval_nodes = {n for job, rule in jobs if rule not in data_rules | {"train"} for n in alloc[job]}
    assert len(data_nodes) >= 2 and len(eval_nodes) >= 2, table

    # (b) training job 1 ran on two nodes, lost the worker node, exited 75; the next ran elsewhere
    train_jobs = t.jobs()
    assert len(train_jobs) >= 2 and len(alloc[job1]) == 2, (train_jobs, alloc)
    assert {r["host"] for r in first} == set(alloc[job1]) == {head, victim} and len(first) == 2
    log = t.log()
    assert re.search(
        r"2 workers on 2 host\(s\): rank 0 on dnode\d \(10\.\d+\.\d+\.\d+\), rank 1 on", log
    )
    attempts = t.attempts()
    print("attempts\n" + "\n".join(map(json.dumps, attempts)))
    assert lost["slurm_job"] == job1 and lost["lost"] == [f"{victim} ({ip_of(first, victim)})"]
    # the job ends with the driver's exit (FAILED) or, if SLURM marks the node DOWN first, NODE_FAIL
    ended = (
        rf"(?:_job_complete: JobId={job1} WEXITSTATUS [1-9]|Killing JobId={job1} on failed node)"
    )
    assert re.search(ended, ctld), ctld[-3000:]
    last = attempts[-1]
    assert last["outcome"] == "finished" and last["resumed_from"] == "step checkpoint"
    assert last["start_step"] == saved and len(last["hosts"]) == 2, last
    assert [a["outcome"] for a in attempts] == ["node lost", "finished"], attempts

    # (c) everything equals the local run (both workers on one node)
    a, b = reference / "results/demo", remote / "results/demo"
    for stage in DATA:
        fa, fb = files_under(a / stage), files_under(b / stage)
        assert fa.keys() == fb.keys() and fa, stage
        for name in fa:
            assert filecmp.cmp(fa[name], fb[name], shallow=False), f"{stage}/{name} differs"
    same_training(reference, remote)
    score = lambda rows: [
        (r["model"], r["task"], r["method"], r["metric"], r["score"], r["std"]) for r in rows
    ]
    assert score(read_csv(a / "eval/results/scores.csv")) == score(
        read_csv(b / "eval/results/scores.csv")
    )
    for png in ("domains", "tasks", "loss_curve"):
        assert (b / f"eval/plots/{png}.png").stat().st_size > 0

    # what the node loss cost: detection, end of the job, resubmission, resumed training
    t_end = ctld_time(ctld, ended)
    t_next = ctld_time(ctld, rf"_slurm_rpc_submit_batch_job: JobId={train_jobs[1]} ")
    cost = {
        "detected_s": round(lost["time"] - t_kill, 1),
        "job_ended_s": round(t_end - t_kill, 1),
        "resubmitted_s": round(t_next - t_kill, 1),
        "resumed_s": round(t_resumed - t_kill, 1),
        "steps_redone": killed_at - saved,
    }
    print("node loss cost (s after the kill):", cost, f"(checkpoint at step {at}..{saved})")
    (Path(tmp_path.parent.parent) / "node-loss-cost.json").write_text(json.dumps(cost) + "\n")
    node_figures.record(
        "node loss",
        f"worker node killed mid-epoch ({victim}: kill -9 of every process in its namespace)",
        tried=1,
        survived=1,
        **cost,
        resumed_at_step=saved,
        jobs=len(train_jobs),
    )


@full_only
def test_an_uninterrupted_two_node_training_equals_the_one_node_run(cluster, reference, tmp_path):
    remote = copy_data(reference, tmp_path / "slurm")
    profile, prefix = profile_for(tmp_path, cluster)
    run = Run(remote, CONFIG, "--profile", str(profile), *TRAINING_OUTPUTS, prefix=prefix)
    t = Training(run, remote)
    rc, out = run.finish(900)
    assert rc == 0, f"snakemake --profile slurm failed ({rc}):\n{out[-8000:]}"
    [job] = t.jobs()
    [attempt] = t.attempts()
    assert attempt["outcome"] == "finished" and attempt["slurm_job"] == job
    assert len(set(attempt["hosts"])) == 2, attempt  # rank 0 and rank 1 on two hosts
    print("ranks on", attempt["hosts"])
    same_training(reference, remote)
    assert read_csv(reference / TRAINING_OUTPUTS[2]) == read_csv(remote / TRAINING_OUTPUTS[2])


@full_only
def test_a_hung_worker_is_ended_by_the_timeout_and_a_lost_head_is_survived(
    cluster, reference, tmp_path, node_figures
):
    remote = copy_data(reference, tmp_path / "slurm")
    profile, prefix = profile_for(tmp_path, cluster)
    log_start = ctld_log_end()
    run = Run(remote, CONFIG, "--profile", str(profile), *TRAINING_OUTPUTS, prefix=prefix)
    t = Training(run, remote)
    with nodes_restored(run):
        job1 = t.job(1)
        placement = t.placement(job1)
        assert len({r["host"] for r in placement}) == 2, placement
        t.at_step(6)
        saved = t.checkpoint_now(job1)
        t.at_step(saved + 2)
        # (1) the worker on the worker node hangs: SIGSTOP
        head, [worker_node] = t.nodes()
        on_node = set(script("pids", worker_node).stdout.split())
        [hung] = [p for p in train_workers(job1) if str(p.pid) in on_node]
        hung.suspend()
        t_hang = time.time()
        t_resumed = resumed_after(t, t_hang, timeout=300)
        restarted = (t.state() / "resume.json").stat().st_mtime
        # the same job: Ray Train ended the worker group and started it again from the checkpoint
        assert t.file("resume.json")["step"] == saved and t.jobs() == [job1]
        hang_log = wait_for(  # (job 1's log: Snakemake rewrites the rule's log for each job)
            "the resume in the job's log",
            lambda: "resuming from step checkpoint" in t.log() and t.log(),
            120,
        )
        print("\n".join(line for line in hang_log.splitlines() if "health check" in line))
        assert not hung.is_running() or hung.status() == "zombie", "the hung worker still exists"
        # (2) the head node is lost in epoch 1
        t.at_step(STEPS_PER_EPOCH + 4)
        saved2 = t.checkpoint_now(job1)
        t.at_step(saved2 + 2)
        t_kill = kill_node(head)
        job2 = t.job(2, timeout=600)
        t_resumed2, rc, out = after_the_lost_node(run, t, head, t_kill)
    assert rc == 0, f"snakemake --profile slurm failed ({rc}):\n{out[-8000:]}"
    assert (
        hang_log.count("resuming from step checkpoint") == 1
        and f"step {saved}, epoch 0" in hang_log.split("resuming from step checkpoint")[1]
    ), hang_log[-4000:]
    ctld = slurmctld_log(log_start)
    # job 1 died with its head node: SLURM ended it (NODE_FAIL) and its driver wrote no attempt
    assert f"Killing JobId={job1} on failed node {head}" in ctld, ctld[-3000:]
    attempts = t.attempts()
    print("attempts\n" + "\n".join(map(json.dumps, attempts)))
    assert [
        (a["slurm_job"], a["outcome"], a["resumed_from"], a["start_step"]) for a in attempts
    ] == [(job2, "finished", "step checkpoint", saved2)]
    same_training(reference, remote)
    t_end = ctld_time(ctld, rf"Killing JobId={job1} on failed node")
    t_next = ctld_time(ctld, rf"_slurm_rpc_submit_batch_job: JobId={job2} ")
    node_figures.record(
        "node loss",
        f"training worker hung (SIGSTOP), hang_timeout_s {TRAINING['hang_timeout_s']}",
        tried=1,
        survived=1,
        restarted_s=round(restarted - t_hang, 1),
        resumed_s=round(t_resumed - t_hang, 1),
        resumed_at_step=saved,
        same_job=True,
    )
    node_figures.record(
        "node loss",
        f"head node killed mid-epoch ({head}: the batch script, the driver, the Ray head and its worker)",
        tried=1,
        survived=1,
        job_ended_s=round(t_end - t_kill, 1) if t_end else None,
        resubmitted_s=round(t_next - t_kill, 1) if t_next else None,
        resumed_s=round(t_resumed2 - t_kill, 1),
        resumed_at_step=saved2,
    )
