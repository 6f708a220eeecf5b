"""The fault suite's figures: every test records its cases (tried, survived, clips lost); at the end
of the session they are written as JSON and Markdown (``fault-figures.{json,md}`` in pytest's base
temporary folder) and printed in the summary. Tests may add files of their own (a plot, raw samples)
with ``figures.attach``. With ``DASHENG_FAULT_FIGURES=path/fault-figures.md`` they are also merged
into that table (``docs/reliability/`` holds the committed copy docs/reliability.md links): see figures.py."""

from __future__ import annotations

import pytest
from faults.figures import Figures


def pytest_configure(config):
    config._fault_figures = Figures()


@pytest.fixture(scope="session")
def figures(request, tmp_path_factory):
    figs = request.config._fault_figures
    yield figs
    if figs.rows:
        figs.write(tmp_path_factory.getbasetemp())
        figs.publish()


def pytest_terminal_summary(terminalreporter, config):
    figs = getattr(config, "_fault_figures", None)
    if figs and figs.rows:
        terminalreporter.section("fault suite figures")
        terminalreporter.write_line(figs.table())


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The loopback server of the suite's DAG (yt-dlp downloads from it)."""
    import fault_util as fu
    from helpers import tone
    from loopback import File, Server, Status

    media = tone(tmp_path_factory.mktemp("fault-media") / "a.m4a", 30.0, freq=330)
    with Server() as srv:
        for vid in fu.GOOD_IDS:
            srv.routes[vid] = File(media, "audio/mp4")
        srv.routes["gone0000000"] = Status(404)
        yield srv


@pytest.fixture(scope="session")
def reference(tmp_path_factory, server):
    """An uninterrupted run of the suite's DAG (data and training): what every faulted run must equal."""
    import fault_util as fu

    work = tmp_path_factory.mktemp("fault-reference")
    fu.run(work, fu.dag_config(fu.segment_list(work), server.url_template), "all")
    return work
