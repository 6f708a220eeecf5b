import os

import pytest
from helpers import HEAR_TASK, NO_CONTROLLER_CONF, SHARED, SPEECH_COMMANDS

# Keep torch/BLAS from oversubscribing the 2-core machine when tests run jobs in parallel.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    # Provenance stamps carry the checkout's git SHA (``-dirty`` with local edits). Freeze the value
    # the session starts with, so that editing a file while the suite runs cannot make two runs that
    # a test compares byte for byte differ in their stamps. The value is still the real one.
    from dasheng_pipeline.common import provenance

    os.environ.setdefault("DASHENG_GIT_SHA", provenance.git_sha())


@pytest.fixture(scope="session", autouse=True)
def slurm_client_points_nowhere(tmp_path_factory):
    """Snakemake's SLURM plugin asks the SLURM controller for its config at every start; outside the
    SLURM tests no controller runs, so the question must fail at once (see helpers.py)."""
    conf = tmp_path_factory.mktemp("no-slurm") / "slurm.conf"
    conf.write_text(NO_CONTROLLER_CONF)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", str(conf))
        yield conf


@pytest.fixture
def hear_task():
    if not HEAR_TASK.is_dir():
        pytest.skip(
            f"shared fixture {HEAR_TASK} is absent (set DASHENG_SHARED to the shared folder)"
        )
    return HEAR_TASK


@pytest.fixture
def speech_commands():
    if not SPEECH_COMMANDS.is_dir():
        pytest.skip(
            f"shared fixture {SPEECH_COMMANDS} is absent (set DASHENG_SHARED to the shared folder)"
        )
    return SPEECH_COMMANDS


@pytest.fixture
def loopback():
    from loopback import Server

    with Server() as server:
        yield server


@pytest.fixture(scope="session")
def shared_dir():
    return SHARED
