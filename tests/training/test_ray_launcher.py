"""The SLURM Ray launcher's logic, run locally: a head and a worker node on 127.0.0.1."""

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from helpers import REPO

LAUNCHER = REPO / "workflow" / "scripts" / "ray_slurm.sh"
DRIVER = """
import signal, sys, time, ray
address = sys.argv[sys.argv.index("--address") + 1]
ray.init(address=address, logging_level="ERROR")
alive = [n for n in ray.nodes() if n["Alive"]]
print("NODES", len(alive), "CPUS", int(ray.cluster_resources()["CPU"]), "ADDRESS", address)
got = []
signal.signal(signal.SIGUSR2, lambda *_: got.append("USR2"))
open(sys.argv[1], "w").close()  # ready: the test signals the launcher now
deadline = time.time() + 60
while not got and time.time() < deadline:
    time.sleep(0.1)
print("DRIVER GOT", got)
"""


@pytest.fixture
def ray_tmp():
    # Ray's socket paths must stay under 107 characters: pytest's tmp_path is too deep.
    folder = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    yield folder
    # (a worker node's folder is <folder>-<node>)
    subprocess.run(["rm", "-rf", str(folder), *map(str, folder.parent.glob(folder.name + "-*"))])


def launch(ray_tmp, nodes: str, *command: str, port: int, wait=True):
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "RAY_NODES": nodes,
        "RAY_HEAD_IP": "127.0.0.1",
        "RAY_PORT": str(port),
        "RAY_WORKER_LAUNCH": "env",
        "RAY_CPUS_PER_NODE": "1",
        "RAY_TMP": str(ray_tmp),
    }
    cmd = ["bash", str(LAUNCHER), *command]
    if not wait:
        return subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def ray_processes(tmp: Path) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if str(tmp) in cmd and ("raylet" in cmd or "gcs_server" in cmd):
            out.append(p)
    return out


@pytest.mark.slow
def test_head_and_worker_on_localhost(tmp_path, ray_tmp):
    """... and SIGUSR2 to the launcher (as `scancel --signal=USR2` sends it) reaches the driver
    (a step checkpoint request) instead of ending the launcher."""
    driver, ready = tmp_path / "driver.py", tmp_path / "ready"
    driver.write_text(DRIVER)
    proc = launch(
        ray_tmp, "node-a node-b", sys.executable, str(driver), str(ready), port=6391, wait=False
    )
    deadline = time.time() + 300
    while not ready.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR2)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "NODES 2 CPUS 2 ADDRESS 127.0.0.1:6391" in out and "DRIVER GOT ['USR2']" in out
    assert "ray_slurm: 2 nodes up" in err
    assert "stopping the Ray cluster (exit status 0)" in err
    time.sleep(2)
    assert ray_processes(ray_tmp) == []  # torn down


@pytest.mark.slow
def test_a_failing_driver_tears_the_cluster_down_and_keeps_its_status(ray_tmp):
    proc = launch(
        ray_tmp, "node-a node-b", sys.executable, "-c", "import sys; sys.exit(3)", port=6392
    )
    assert proc.returncode == 3
    assert "stopping the Ray cluster (exit status 3)" in proc.stderr
    time.sleep(2)
    assert ray_processes(ray_tmp) == []


def test_one_node_runs_the_command_as_it_is(ray_tmp):
    proc = launch(
        ray_tmp, "node-a", sys.executable, "-c", "import sys; print(sys.argv[1:])", "x", port=6393
    )
    assert (
        proc.returncode == 0 and proc.stdout.strip() == "['x']"
    )  # no --address: a local Ray instance
    assert "ray_slurm" not in proc.stderr
