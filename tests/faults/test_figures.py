"""The fault table's merge: a session's groups replace their rows in the published table, in place;
other groups' rows stay (the fault suite and the multi-node SLURM test publish into one table)."""

import json

from faults.figures import Figures


def test_publishing_replaces_this_sessions_groups_and_keeps_the_others(tmp_path, monkeypatch):
    target = tmp_path / "fault-figures.md"
    monkeypatch.setenv("DASHENG_FAULT_FIGURES", str(target))
    suite = Figures()
    suite.record("kill -9", "fetch job", tried=1, survived=1)
    suite.record("node loss", "old case", tried=1, survived=0, detected_s=99)
    suite.record("network", "404", tried=1, survived=1, attempts=1)
    suite.publish()
    # (the JSON keeps details in sorted order; the published lines of other groups stay verbatim)
    md = target.read_text().replace(
        "| 404 | 1 | 1 | 0 | attempts 1 |", "| 404 | 1 | 1 | 0 | as written |"
    )
    target.write_text(md)
    nodes = Figures()
    nodes.record("node loss", "worker node", tried=1, survived=1, detected_s=15.2)
    nodes.record("node loss", "head node", tried=1, survived=1)
    nodes.publish()
    rows = json.loads(target.with_suffix(".json").read_text())
    assert [(r["group"], r["case"]) for r in rows] == [
        ("kill -9", "fetch job"),
        ("node loss", "worker node"),
        ("node loss", "head node"),
        ("network", "404"),
    ]
    table = target.read_text().splitlines()
    assert table[3] == "| node loss | worker node | 1 | 1 | 0 | detected_s 15.2 |"
    assert table[5] == "| network | 404 | 1 | 1 | 0 | as written |"
    assert table[-1] == "| **total** | | **4** | **4** | **0** | |"
