"""The fault table: every fault test records its cases (tried, survived, clips lost, details).

The fault suite (``tests/faults/conftest.py``) and the multi-node SLURM test
(``tests/test_slurm_multinode.py``, the node-loss cases) both write one. ``write`` puts it as JSON and
Markdown into a folder (pytest's base temporary folder); with ``DASHENG_FAULT_FIGURES=
path/fault-figures.md`` ``publish`` also merges it into that table (``docs/reliability/`` holds the
committed one): the groups this session ran replace their rows there, the other groups' rows stay,
so a run of one suite never drops the other's rows."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

COUNTS = ("tried", "survived", "clips_lost")


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

    @staticmethod
    def line(r: dict) -> str:
        extra = "; ".join(f"{k} {v}" for k, v in r.items() if k not in ("group", "case", *COUNTS))
        return f"| {r['group']} | {r['case']} | {r['tried']} | {r['survived']} | {r['clips_lost']} | {extra} |"

    def table(self, rows: list[dict] | None = None, kept: dict | None = None) -> str:
        """The Markdown table of ``rows`` (this session's by default); ``kept``: lines to reuse
        verbatim, by (group, case) (a published table's, whose JSON lost the details' order)."""
        rows = self.rows if rows is None else rows
        lines = [
            "| group | case | tried | survived | clips lost | details |",
            "|---|---|---|---|---|---|",
        ]
        mine = {(r["group"], r["case"]) for r in self.rows}
        for r in rows:
            key = (r["group"], r["case"])
            lines.append(
                (kept or {}).get(key) if key not in mine and key in (kept or {}) else self.line(r)
            )
        total = {k: sum(r[k] for r in rows) for k in COUNTS}
        lines.append(
            f"| **total** | | **{total['tried']}** | **{total['survived']}** | **{total['clips_lost']}** | |"
        )
        return "\n".join(lines)

    def write(self, folder: Path, stem: str = "fault-figures") -> None:
        (folder / f"{stem}.json").write_text(json.dumps(self.rows, indent=1, sort_keys=True) + "\n")
        (folder / f"{stem}.md").write_text(self.table() + "\n")

    def merged(self, old: list[dict]) -> list[dict]:
        """``old`` rows with this session's groups replaced by its rows (in the place of the
        group's first old row; new groups at the end)."""
        mine = {r["group"] for r in self.rows}
        out, placed = [], set()
        for r in old:
            if r["group"] not in mine:
                out.append(r)
            elif r["group"] not in placed:
                out += [n for n in self.rows if n["group"] == r["group"]]
                placed.add(r["group"])
        return out + [r for r in self.rows if r["group"] not in placed]

    def publish(self) -> None:
        """Merge into the table named by ``DASHENG_FAULT_FIGURES`` (if set), with attached files."""
        target = os.environ.get("DASHENG_FAULT_FIGURES")
        if not target or not self.rows:
            return
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        data = target.with_suffix(".json")
        rows = self.merged(json.loads(data.read_text()) if data.exists() else [])
        kept = {}
        if target.exists():  # the other groups' lines stay as they were
            for text in target.read_text().splitlines():
                cells = [c.strip() for c in text.split("|")]
                if len(cells) > 3 and cells[1] and not cells[1].startswith(("group", "---", "**")):
                    kept[(cells[1], cells[2])] = text
        data.write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
        target.write_text(self.table(rows, kept) + "\n")
        for path in self.attached:
            shutil.copyfile(path, target.parent / path.name)
