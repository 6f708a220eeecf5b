import os
import shutil
import tempfile
from pathlib import Path

import pytest

from helpers import HEAR_TASK, SHARED, SPEECH_COMMANDS, point_slurm_client_nowhere

# Keep torch/BLAS from oversubscribing the 2-core machine when tests run jobs in parallel.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    # Provenance stamps carry the checkout's git SHA (``-dirty`` with local edits). Freeze the value
    # the session starts with, so that editing a file while the suite runs cannot make two runs that
    # a test compares byte for byte differ in their stamps. The value is still the real one.
    from pipeline.common import provenance

    os.environ.setdefault("DASHENG_GIT_SHA", provenance.git_sha())
    # Snakemake's SLURM plugin asks the SLURM controller for its config at every start; outside the
    # SLURM tests no controller runs, so the question must fail at once (see helpers.py).
    config._no_slurm_dir = tempfile.mkdtemp(prefix="dasheng-no-slurm-")
    point_slurm_client_nowhere(Path(config._no_slurm_dir))


def pytest_unconfigure(config):
    if getattr(config, "_no_slurm_dir", None):
        shutil.rmtree(config._no_slurm_dir, ignore_errors=True)


@pytest.fixture
def hear_task():
    if not HEAR_TASK.is_dir():
        pytest.skip(f"shared fixture {HEAR_TASK} is absent (set DASHENG_SHARED to the shared folder)")
    return HEAR_TASK


@pytest.fixture
def speech_commands():
    if not SPEECH_COMMANDS.is_dir():
        pytest.skip(f"shared fixture {SPEECH_COMMANDS} is absent (set DASHENG_SHARED to the shared folder)")
    return SPEECH_COMMANDS


@pytest.fixture
def loopback():
    from loopback import Server

    with Server() as server:
        yield server


@pytest.fixture(scope="session")
def shared_dir():
    return SHARED
