"""The fault suite's figures: every test records its cases (tried, survived, clips lost); at the end
of the session they are written as JSON and Markdown (``fault-figures.{json,md}`` in pytest's base
temporary folder) and printed in the summary. Tests may add files of their own (a plot, raw samples)
with ``figures.attach``. With ``DASHENG_FAULT_FIGURES=path/fault-figures.md`` all of them are also
copied into that folder (``docs/reliability/`` holds the committed copy docs/reliability.md links)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest


class Figures:
    def __init__(self):
        self.rows: list[dict] = []
        self.attached: list[Path] = []

    def record(
        self, group: str, case: str, *, tried: int, survived: int, lost: int = 0, **details
    ) -> None:
        self.rows.append(
            {
                "group": group,
                "case": case,
                "tried": tried,
                "survived": survived,
                "clips_lost": lost,
                **details,
            }
        )

    def attach(self, path: Path) -> None:
        """A file the test wrote that belongs with the figures (copied along with them)."""
        self.attached.append(Path(path))

    def table(self) -> str:
        lines = [
            "| group | case | tried | survived | clips lost | details |",
            "|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            extra = "; ".join(
                f"{k} {v}"
                for k, v in r.items()
                if k not in ("group", "case", "tried", "survived", "clips_lost")
            )
            lines.append(
                f"| {r['group']} | {r['case']} | {r['tried']} | {r['survived']} | {r['clips_lost']} | {extra} |"
            )
        total = {k: sum(r[k] for r in self.rows) for k in ("tried", "survived", "clips_lost")}
        lines.append(
            f"| **total** | | **{total['tried']}** | **{total['survived']}** | **{total['clips_lost']}** | |"
        )
        return "\n".join(lines)


def pytest_configure(config):
    config._fault_figures = Figures()


@pytest.fixture(scope="session")
def figures(request, tmp_path_factory):
    figs = request.config._fault_figures
    yield figs
    if not figs.rows:
        return
    base = tmp_path_factory.getbasetemp()
    (base / "fault-figures.json").write_text(json.dumps(figs.rows, indent=1, sort_keys=True) + "\n")
    (base / "fault-figures.md").write_text(figs.table() + "\n")
    target = os.environ.get("DASHENG_FAULT_FIGURES")
    if target:
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(base / "fault-figures.md", target)
        shutil.copyfile(base / "fault-figures.json", target.with_suffix(".json"))
        for path in figs.attached:
            shutil.copyfile(path, target.parent / path.name)


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
