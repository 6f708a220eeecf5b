"""Fixtures for the model tests."""

from __future__ import annotations

import pytest
import torch
from model_testutil import trained_like

from dasheng_model.encoder import DashengEncoder


@pytest.fixture(autouse=True)
def _modest_threads():
    torch.set_num_threads(min(2, torch.get_num_threads()))  # the machine's 2 cores at most
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def tiny() -> DashengEncoder:
    """A random tiny encoder with non-trivial init_bn statistics, in eval mode."""
    torch.manual_seed(0)
    return trained_like(DashengEncoder("tiny"))
