"""Shared machinery of the fault suite: Snakemake runs in the background, kill -9 at a seeded
random point of a named job, the clip accounting of a run, and the figures the suite reports."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import helpers
import psutil
import pyarrow.parquet as pq

OUT = "results/demo"


def env_for(workdir: Path) -> dict:
    # Ray's session folder (sockets: keep the path short), so that a sweep finds its processes.
    # (The git SHA of the stamps is frozen for the whole test session: tests/conftest.py.)
    return helpers.snakemake_env(DASHENG_RAY_TMP=ray_tmp(workdir))


def ray_tmp(workdir: Path) -> str:
    return "/tmp/ray-f" + hashlib.md5(str(workdir).encode()).hexdigest()[:10]


def run(
    workdir: Path, config: dict, *args: str, check: bool = True, timeout: int = 600, **popen
) -> subprocess.CompletedProcess:
    """A real Snakemake run (foreground), with the suite's environment."""
    return helpers.snakemake(
        workdir, config, *args, check=check, timeout=timeout, env=env_for(workdir), **popen
    )


def start(
    workdir: Path, config: dict, *args: str, log_name: str = "snakemake.log"
) -> subprocess.Popen:
    """A real Snakemake run in the background, in a session of its own (so it can be killed whole)."""
    cmd = helpers.snakemake_cmd(workdir, config, *args)
    log = open(workdir / log_name, "ab")
    return subprocess.Popen(
        cmd,
        cwd=workdir,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env_for(workdir),
        start_new_session=True,
    )


# ----------------------------------------------------------------------------- processes


def cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


def session_processes(sid: int) -> list[psutil.Process]:
    """Every live process of session ``sid`` (children that left the process group included)."""
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            continue
    return out


def kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass


def signal_trees(jobs: list[psutil.Process], sig: int) -> None:
    for job in jobs:
        try:
            for p in [job, *job.children(recursive=True)]:
                p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def kill_session(popen: subprocess.Popen, extra_marker: str | None = None) -> None:
    """kill -9 everything the run started (a machine crash as far as the run can tell)."""
    for _ in range(50):
        procs = session_processes(popen.pid)
        if extra_marker:
            procs += [p for p in psutil.process_iter() if extra_marker in cmdline(p)]
        if not procs:
            break
        kill_all(procs)
        time.sleep(0.1)
    popen.wait(timeout=30)


def sweep(marker: str) -> int:
    """Kill leftover processes whose command line holds ``marker`` (a work folder, a Ray session)."""
    victims = [p for p in psutil.process_iter() if p.pid != os.getpid() and marker in cmdline(p)]
    kill_all(victims)
    return len(victims)


def kill_at_random_point(
    popen: subprocess.Popen,
    marker: str,
    rng,
    max_delay: float,
    *,
    mode: str = "all",
    ready=None,
    freeze: bool = False,
    timeout: float = 300,
) -> dict:
    """Wait until a job whose command line holds ``marker`` runs (and ``ready()`` holds), then kill -9
    at a moment drawn from U(0, max_delay) s later, checking a matching job is alive at that moment.

    mode "all": the whole run (Snakemake and every job: a crash); mode "job": the job's process
    tree only (as the OOM killer would), Snakemake sees it fail. ``freeze``: for jobs shorter than
    a poll's reach, the kill point is ``ready()`` alone (max_delay 0) and the job is stopped
    (SIGSTOP) the moment it is seen there, so that it cannot finish before the kill. Returns what
    was hit."""
    deadline = time.monotonic() + timeout
    target = None
    delay = None
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise AssertionError(
                f"the run ended (rc {popen.returncode}) before a {marker!r} job could be killed"
            )
        jobs = [
            p
            for p in session_processes(popen.pid)
            if marker in cmdline(p) and "bash" not in p.name()
        ]
        now = time.monotonic()
        if jobs and (ready is None or ready()):
            if target is None:
                delay = rng.uniform(0, max_delay) if max_delay > 0 else 0.0
                target = now + delay
            if now >= target:
                if freeze:
                    signal_trees(jobs, signal.SIGSTOP)
                hit = cmdline(jobs[0])
                if mode == "all":
                    kill_session(popen)
                else:
                    tree = []
                    for job in jobs:
                        try:
                            tree += [job, *job.children(recursive=True)]
                        except psutil.NoSuchProcess:
                            pass
                    kill_all(tree)
                    assert popen.wait(timeout=300) != 0
                return {"marker": marker, "mode": mode, "delay_s": round(delay, 3), "job": hit}
        elif target is not None and not jobs:
            # That job ended before its kill point: the next one gets a shorter draw.
            target, max_delay = None, max_delay / 2
        time.sleep(0.02)
    raise AssertionError(f"no {marker!r} job to kill within {timeout} s")


# ----------------------------------------------------------------------------- results


def read_json(path: Path) -> dict:
    with open(path) as fh:
        return json.load(fh)


def accounting(workdir: Path) -> dict[tuple[str, str, int], tuple[str, str, int]]:
    """(source, chunk, position) → (clip_id, status, windows) over every shard manifest: the final
    status of every clip of every chunk."""
    out = {}
    for path in sorted((workdir / OUT / "shards").glob("*/*.json")):
        doc = read_json(path)
        for i, c in enumerate(doc["clips"]):
            out[(doc["source"], doc["chunk"], i)] = (c["clip_id"], c["status"], c.get("windows", 0))
    return out


def clips_lost(reference: dict, got: dict) -> int:
    """Clips of the reference whose final record is missing or different (ok clips must keep their
    window count), plus any extra record (a duplicated clip)."""
    missing = sum(1 for key, value in reference.items() if got.get(key) != value)
    return missing + len(set(got) - set(reference))


def digests(
    root: Path, patterns=("shards/**/*.parquet", "shards/*/*.json", "dataset/*.json")
) -> dict[str, str]:
    out = {}
    for pattern in patterns:
        for path in sorted(root.glob(pattern)):
            if path.is_file() and ".damaged" not in path.parts:
                out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def temp_leftovers(root: Path) -> list[str]:
    """Files a killed writer could leave: temporary names (``.tmp-``) anywhere under ``root``."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.tmp-*"))


def untrusted_finals(root: Path) -> list[str]:
    """Files under a final name that are not whole: JSON that does not parse, Parquet without its
    footer. (The atomic writes promise there are none, even right after a kill -9.)"""
    bad = []
    for path in root.rglob("*.json"):
        if ".tmp-" in path.name or "training_state" in path.parts:
            continue
        try:
            json.loads(path.read_text())
        except ValueError:
            bad.append(str(path.relative_to(root)))
    for path in root.rglob("*.parquet"):
        try:
            _ = pq.ParquetFile(path).metadata
        except Exception:  # noqa: BLE001 - any unreadable file counts
            bad.append(str(path.relative_to(root)))
    return sorted(bad)


def verify_dataset(workdir: Path) -> int:
    """Check every shard the dataset manifest lists against its sha256; returns how many."""
    from dasheng_pipeline.features import shards

    doc = read_json(workdir / OUT / "dataset/manifest.json")
    for entry in doc["shards"]:
        shards.verify(workdir / entry["path"], entry["sha256"])
    return len(doc["shards"])


# ----------------------------------------------------------------------------- the suite's DAG

# A small DAG with all three kinds of work: a youtube source (yt-dlp against the loopback server;
# one 404, one invalid ID, one duplicate row), a demo corpus and a held-out demo source, then
# tiny-MAE training on 2 CPU workers. Shards are cut small (3 windows) so that chunks have parts.
TRAINING = {
    "size": "tiny",
    "epochs": 3,
    "batches_per_epoch": 4,
    "global_batch": 8,
    "lr": 1e-3,
    "warmup_epochs": 1,
    "validation_sources": ["demo_valid"],
    "validation_rows": 4,
    "workers": 2,
    "use_gpu": False,
    "cpus_per_worker": 1,
    "loader_workers": 0,
    "shuffle_buffer": 16,
    "log_every": 1,
    "object_store_mb": 128,
    "optimizer": "adamw8bit",
    "keep_best": 4,
    "average_best": 2,
    "max_failures": 1,
    "gpus_per_node": 0,
    "mem_mb": 4000,
    "runtime_min": 30,
    "total_runtime_min": 30,
    "checkpoint_every_min": 0,
}
GOOD_IDS = [f"clip{i:07d}" for i in range(8)]
# Clips of the DAG: 11 list rows (8 ok, a 404, an invalid ID, a duplicate), 12 + 4 demo clips.
DAG_CLIPS = {"ok": 8 + 12 + 4, "failed": 1, "rejected": 2}


def dag_config(listing: Path, url_template: str) -> dict:
    return {
        "sources": {
            "yt": {
                "type": "youtube",
                "list": str(listing),
                "format": "audioset",
                "chunk_size": 4,
                "url_template": url_template,
                "sleep_between_s": 0,  # a loopback server: no politeness pause
                "retries": 1,
                "backoff_s": 0.1,
                "socket_timeout_s": 5,
                "attempt_timeout_s": 60,
            },
            "demo": {"type": "demo", "clips": 12, "chunk_size": 6, "min_s": 2.0, "max_s": 9.0},
            "demo_valid": {
                "type": "demo",
                "stream": 1000,
                "clips": 4,
                "chunk_size": 4,
                "min_s": 3.0,
                "max_s": 8.0,
            },
        },
        "shards": {"max_rows": 3, "row_group_size": 2},
        "training": TRAINING,
        "evaluation": {"enabled": False},
    }


def segment_list(folder: Path) -> Path:
    rows = [
        f'{vid}, {2.5 * i:.3f}, {2.5 * i + 10:.3f}, "/m/{i % 3}"' for i, vid in enumerate(GOOD_IDS)
    ]
    rows.insert(3, 'gone0000000, 0.000, 10.000, "/m/x"')  # 404: failed
    rows.insert(6, 'not/an/id, 0, 10, "/m/x"')  # invalid ID: rejected
    rows.append(rows[0])  # a duplicate row: rejected
    path = folder / "segments.csv"
    path.write_text(
        "# YTID, start_seconds, end_seconds, positive_labels\n" + "\n".join(rows) + "\n"
    )
    return path
