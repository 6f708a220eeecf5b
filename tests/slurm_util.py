"""Shared machinery of the SLURM tests (tests/test_slurm.py, tests/test_slurm_multinode.py): a local
cluster brought up by scripts/slurm_local.sh, profiles derived from slurm/config.yaml, Snakemake runs
that never hang, and what SLURM's controller log says about the jobs."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml
from helpers import REPO, SLURM_CONF_AT_START, snakemake_cmd, snakemake_env

SCRIPT = REPO / "scripts" / "slurm_local.sh"
PROFILE = REPO / "slurm" / "config.yaml"
CONF = Path("/etc/slurm/slurm.conf")
RUN_TIMEOUT_S = 420  # one Snakemake run through SLURM (about 2-3 minutes on 2 cores)

# About the smallest DAG that still has every stage: 3 chunks of demo audio → 3 shards → dataset
# manifest → 1 epoch of the tiny MAE on 1 CPU worker → one small demo task, trained encoder and
# log-mel baseline, probe and k-NN → tables and plots (18 SLURM jobs).
DEMO_CONFIG = {
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


def script(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout
    )


def configured_nodes() -> int:
    """Nodes of the cluster scripts/slurm_local.sh configured (0: none of its own)."""
    try:
        text = CONF.read_text()
    except OSError:
        return 0
    if "# Written by scripts/slurm_local.sh (dasheng)" not in text:
        return 0
    return len(re.findall(r"^NodeName=dnode\d", text, re.M)) or 1


@contextlib.contextmanager
def local_cluster(nodes: int):
    """A running local cluster of ``nodes`` nodes; yields its default partition. Inside, the tests see
    the real SLURM config (the rest of the suite points the SLURM client nowhere: see helpers.py).
    Afterwards the cluster is stopped, or put back as it was if one was running before."""
    with pytest.MonkeyPatch.context() as mp:
        if SLURM_CONF_AT_START is None:
            mp.delenv("SLURM_CONF", raising=False)
        else:
            mp.setenv("SLURM_CONF", SLURM_CONF_AT_START)
        if not sys.platform.startswith("linux"):
            pytest.skip("the local SLURM cluster needs Linux")
        if os.geteuid() != 0:
            pytest.skip(f"bringing up a local SLURM cluster needs root ({SCRIPT.name} start)")
        if not shutil.which("sbatch") and not shutil.which("apt-get"):
            pytest.skip(
                "SLURM is not installed and apt-get is not available to install slurm-wlm and munge"
            )
        if nodes > 1 and not (shutil.which("ip") and shutil.which("unshare")):
            if not shutil.which("apt-get"):
                pytest.skip("a multi-node cluster needs iproute2 (ip netns) and unshare")
        before = configured_nodes() if script("status", timeout=60).returncode == 0 else 0
        start = time.monotonic()
        proc = script("start", "--nodes", str(nodes))
        if proc.returncode == 3:
            pytest.skip(
                f"a local SLURM cluster cannot be set up here: {proc.stderr.strip()[-500:]}"
            )
        assert proc.returncode == 0, f"{SCRIPT} start failed:\n{proc.stdout}\n{proc.stderr}"
        print(f"\nSLURM ({nodes} node(s)) up in {time.monotonic() - start:.1f} s\n{proc.stdout}")
        partitions = subprocess.run(
            ["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, check=True
        ).stdout
        default = next(
            (p.rstrip("*") for p in partitions.split() if p.endswith("*")), partitions.split()[0]
        )
        try:
            yield default
        finally:
            after = script("start", "--nodes", str(before)) if before else script("stop")
            print(after.stdout, after.stderr)


def derived_profile(folder: Path, partition: str, prefix: str, **settings) -> Path:
    """slurm/config.yaml as `scripts/slurm_local.sh profile` derives it for this cluster (its
    partition, no account), plus test-only settings: a unique job-name prefix (to find and cancel
    our jobs), a shorter first status poll (the DAG is many short jobs in a row) and ``settings``."""
    proc = script("profile", str(folder), timeout=60)
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
    profile.update(settings)
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


class Run:
    """A Snakemake run in the background (its own process group, output to a file), for tests
    that act on it while it runs; ``finish`` never hangs."""

    def __init__(
        self, workdir: Path, config: dict, *args: str, prefix: str | None, label: str = "all"
    ):
        self.cmd = snakemake_cmd(workdir, config, *args, label=label, cores=None)
        self.log, self.prefix = workdir / f"snakemake-{label}.log", prefix
        # SLURM jobs inherit this environment (sbatch --export=ALL). Ray's socket paths must stay short.
        self.ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
        env = snakemake_env(DASHENG_RAY_TMP=self.ray_tmp)
        with open(self.log, "w") as fh:
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=workdir,
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def finish(self, timeout: float) -> tuple[int, str]:
        """Wait for the run; after ``timeout`` s the whole group gets SIGKILL (a stuck Snakemake
        ignores SIGTERM) and the SLURM jobs whose name starts with ``prefix`` are cancelled.
        Returns the exit status and the output."""
        try:
            rc = self.proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            self.kill()
            queue = subprocess.run(["squeue"], capture_output=True, text=True).stdout
            raise AssertionError(
                f"{' '.join(self.cmd[2:])} did not finish in time (killed):\n"
                f"{self.output()[-6000:]}\n{queue}"
            ) from None
        finally:
            self.cleanup()
        return rc, self.output()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def cleanup(self) -> None:
        if self.prefix:
            cancel_jobs(self.prefix)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def run_snakemake(
    workdir: Path,
    config: dict,
    *args: str,
    prefix: str | None = None,
    label: str = "all",
    timeout: int = RUN_TIMEOUT_S,
) -> tuple[int, str]:
    """Run the workflow to its end (see Run.finish); returns the exit status and the output."""
    return Run(workdir, config, *args, prefix=prefix, label=label).finish(timeout)


def files_under(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _ctld_log_path() -> Path:
    config = subprocess.run(
        ["scontrol", "show", "config"], capture_output=True, text=True, check=True
    ).stdout
    return Path(re.search(r"^SlurmctldLogFile\s*=\s*(\S+)", config, re.M).group(1))


def ctld_log_end() -> int:
    """Where the controller's log ends now: pass it to ``slurmctld_log`` to read a test's part only
    (the log outlives clusters, and a cluster of a new layout numbers its jobs from 1 again)."""
    return _ctld_log_path().stat().st_size


def slurmctld_log(since: int = 0) -> str:
    with open(_ctld_log_path(), "rb") as fh:
        fh.seek(since)
        return fh.read().decode(errors="replace")


def submitted(out: str) -> list[tuple[str, str]]:
    """(Snakemake job id, SLURM job id) of every submission in a Snakemake output, in order."""
    return re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", out)


def allocations(ctld: str) -> dict[str, list[str]]:
    """The nodes SLURM gave each job (the controller log: no accounting database here)."""
    out = {}
    for job, nodelist in re.findall(r"sched: Allocate JobId=(\d+) NodeList=(\S+)", ctld):
        out[job] = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True
        ).stdout.split()
    return out


def ctld_time(ctld: str, pattern: str) -> float | None:
    """The time (epoch seconds) of the first controller log line matching ``pattern``."""
    m = re.search(r"^\[([0-9T:.-]+)\] [^\n]*" + pattern, ctld, re.M)
    if not m:
        return None
    return time.mktime(time.strptime(m.group(1).split(".")[0], "%Y-%m-%dT%H:%M:%S")) + float(
        "0." + (m.group(1).split(".") + ["0"])[1]
    )


def read_json(path: Path) -> dict | list | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def wait_for(what: str, check, timeout: float, every: float = 0.2, run: Run | None = None):
    """Poll ``check()`` until it returns something true; fail naming ``what`` after ``timeout`` s
    (or as soon as ``run`` ended)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if run is not None and run.proc.poll() is not None:
            raise AssertionError(
                f"the run ended (exit status {run.proc.returncode}) before {what}:\n"
                f"{run.output()[-6000:]}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)


def training_driver(workdir: Path, slurm_job: str) -> psutil.Process | None:
    """The training driver of SLURM job ``slurm_job`` running in ``workdir``."""
    for p in psutil.process_iter(["cmdline", "cwd"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if "dasheng_pipeline.training.train" not in cmd or "bash" in cmd.split()[0]:
                continue
            if p.info["cwd"] == str(workdir) and p.environ().get("SLURM_JOB_ID") == slurm_job:
                return p
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return None


def train_workers(slurm_job: str) -> list[psutil.Process]:
    """The Ray Train worker processes of SLURM job ``slurm_job`` (every node's)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "RayTrainWorker" not in " ".join(p.info["cmdline"] or []):
                continue
            if p.environ().get("SLURM_JOB_ID") == slurm_job:
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out
