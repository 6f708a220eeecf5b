"""The data stage's coverage report: what each source saw, obtained and rejected, and for each
corpus with an ID list, how many IDs it lists, how many each route obtained and how many are
missing (by the reason class of their last attempt).

``data/coverage.csv`` is a tidy table (one count per row):

=========  ==========================================================================
scope      ``source`` or ``corpus``
name       the source's or the corpus's name
route      for a corpus's ``obtained`` rows: the route (a source name); else empty
measure    source: ``seen`` (items), ``ok``, ``failed``, ``rejected``, ``skipped``,
           ``file_failed``, ``file_rejected`` (whole files or shards);
           corpus: ``listed``, ``invalid_rows``, ``obtained``, ``missing``
reason     the reason class of failed / rejected / skipped / missing counts ("" = all)
count      the number
=========  ==========================================================================

A corpus's ``missing`` IDs are split by the reason class of the last route that tried them
(``permanent``, ``transient``, ``undecodable``, ...) or ``not offered`` when no route had them.
``data/coverage.png`` draws the corpora's coverage (or, without corpora, the sources').

``python -m dasheng_pipeline.sources.coverage --params ... --csv ... --png ...``
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import logging
import re
from pathlib import Path

from dasheng_pipeline.common import atomic, logs, manifest, provenance
from dasheng_pipeline.sources import routes

log = logging.getLogger(__name__)

FIELDS = ("scope", "name", "route", "measure", "reason", "count")
SOURCE_MEASURES = ("seen", "ok", "failed", "rejected", "skipped", "file_failed", "file_rejected")
_PREFIX = re.compile(r"^([A-Za-z][A-Za-z /_-]{0,40}?):")


def reason_class(row: dict) -> str:
    """A row's reason class: its own ``reason_class``, YouTube's permanent / transient, or the
    part of its reason before the first colon ("undecodable: ...", "silent: ...")."""
    if row.get("reason_class"):
        return row["reason_class"]
    reason = row.get("reason", "")
    for kind in ("permanent", "transient"):
        if f"({kind};" in reason:
            return kind
    m = _PREFIX.match(reason)
    if m:
        return m.group(1).strip()
    if reason.startswith("duplicate"):
        return "duplicate"
    if "is not a YouTube ID" in reason or reason.startswith("expected "):
        return "invalid row"
    if "NaN" in reason:
        return "not finite"
    return reason.split("(")[0].strip()[:40] or "other"


def source_counts(
    name: str, manifest_paths: list[str], keys: str | None = None
) -> tuple[list[dict], dict[str, dict]]:
    """The source's rows of the table, and its clips by ID (an ok row wins). ``keys``: a
    mirror's key table (its later copies of a key count as rejected duplicates, as the mel jobs
    reject them)."""
    counts: collections.Counter = collections.Counter()
    by_id: dict[str, dict] = {}
    for path in manifest_paths:
        doc = manifest.read(path)
        for reason, n in (doc.get("skipped") or {}).items():
            counts[("skipped", reason)] += n
        clips = routes.resolve_clips(doc, keys) if keys else doc["clips"]
        for clip in clips:
            if clip.get("unit") == "file":
                counts[(f"file_{clip['status']}", reason_class(clip))] += 1
                continue
            counts[("seen", "")] += 1
            counts[(clip["status"], "" if clip["status"] == "ok" else reason_class(clip))] += 1
            if clip["status"] == "ok" or clip["clip_id"] not in by_id:
                by_id[clip["clip_id"]] = clip
            elif by_id[clip["clip_id"]]["status"] != "ok":
                by_id[clip["clip_id"]] = clip
    counts[("seen", "")] += 0
    order = {m: i for i, m in enumerate(SOURCE_MEASURES)}
    rows = [
        _row("source", name, "", measure, reason, n)
        for (measure, reason), n in sorted(
            counts.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])
        )
    ]
    return rows, by_id


def _row(scope, name, route, measure, reason, count) -> dict:
    return {
        "scope": scope,
        "name": name,
        "route": route,
        "measure": measure,
        "reason": reason,
        "count": int(count),
    }


def corpus_counts(
    name: str, ids_path: str, route_names: list[str], clips: dict[str, dict]
) -> list[dict]:
    """The corpus's rows: listed, obtained per route, missing by reason class."""
    import pyarrow.parquet as pq

    info = routes.read_ids_info(ids_path)
    listed = pq.read_table(ids_path, columns=["id"]).column("id").to_pylist()
    rows = [
        _row("corpus", name, "", "listed", "", len(listed)),
        _row("corpus", name, "", "invalid_rows", "", info["invalid"] + info["repeated"]),
    ]
    obtained = collections.Counter()
    missing = collections.Counter()
    for ident in listed:
        last = None
        for route in route_names:
            clip = clips[route].get(ident)
            if clip is None:
                continue
            if clip["status"] == "ok":
                obtained[route] += 1
                break
            last = clip
        else:
            missing["not offered" if last is None else reason_class(last)] += 1
    rows += [_row("corpus", name, r, "obtained", "", obtained[r]) for r in route_names]
    rows.append(_row("corpus", name, "", "missing", "", sum(missing.values())))
    rows += [_row("corpus", name, "", "missing", k, v) for k, v in sorted(missing.items())]
    return rows


def build(params: dict, csv_out: str, png_out: str | None) -> list[dict]:
    """``params``: ``sources`` {name: {manifests, keys}}, ``corpora`` {name: {ids, routes}}."""
    rows: list[dict] = []
    clips: dict[str, dict[str, dict]] = {}
    for name, src in params["sources"].items():
        source_rows, clips[name] = source_counts(name, src["manifests"], src.get("keys"))
        rows += source_rows
    for name, corpus in params["corpora"].items():
        rows += corpus_counts(name, corpus["ids"], corpus["routes"], clips)
    with atomic.atomic_open(csv_out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    if png_out:
        plot(rows, png_out, provenance.stamp(params, params.get("seed")))
    for r in rows:
        if (
            r["scope"] == "corpus"
            and r["measure"] in ("listed", "obtained", "missing")
            and not r["reason"]
        ):
            log.info(
                f"corpus {r['name']}: {r['measure']} {r['route']} {r['count']}".replace("  ", " ")
            )
    return rows


def _bars(rows: list[dict]) -> dict[str, list[tuple[str, int]]]:
    """Per corpus (or per source when there are no corpora): (segment label, count) in order."""
    bars: dict[str, list[tuple[str, int]]] = {}
    corpora = [r for r in rows if r["scope"] == "corpus"]
    if corpora:
        for r in corpora:
            if r["measure"] == "obtained":
                bars.setdefault(r["name"], []).append((f"obtained: {r['route']}", r["count"]))
            elif r["measure"] == "missing" and r["reason"]:
                bars.setdefault(r["name"], []).append((f"missing: {r['reason']}", r["count"]))
        return bars
    for r in rows:
        if r["measure"] in ("ok", "failed", "rejected"):
            label = "ok" if r["measure"] == "ok" else f"{r['measure']}: {r['reason']}"
            bars.setdefault(r["name"], []).append((label, r["count"]))
    return bars


def plot(rows: list[dict], out: str, stamp: dict) -> None:
    """Horizontal stacked bars, one per corpus (per source without corpora), in percent."""
    from dasheng_pipeline.common import figures

    plt = figures.plt
    bars = _bars(rows)
    labels = list(dict.fromkeys(label for segs in bars.values() for label, _ in segs))
    cmap = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(8, 0.6 * max(2, len(bars)) + 1.2))
    for y, segs in enumerate(bars.values()):
        total = sum(n for _, n in segs) or 1
        left = 0.0
        for label, n in segs:
            width = 100.0 * n / total
            ax.barh(y, width, left=left, color=cmap(labels.index(label) % 20), label=label)
            if width > 6:
                ax.text(left + width / 2, y, str(n), ha="center", va="center", fontsize=8)
            left += width
    ax.set_yticks(range(len(bars)), list(bars))
    ax.set_xlim(0, 100)
    ax.set_xlabel(
        "% of the IDs listed" if any(r["scope"] == "corpus" for r in rows) else "% of items seen"
    )
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles))
    ax.legend(
        unique.values(),
        unique.keys(),
        loc="upper center",
        bbox_to_anchor=(0.5, -0.25),
        ncol=2,
        fontsize=8,
    )
    ax.set_title(
        "Coverage: where each ID came from, and why the rest is missing"
        if any(r["scope"] == "corpus" for r in rows)
        else "Coverage: what each source obtained, and why the rest was rejected"
    )
    figures.save_png(fig, out, stamp)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dasheng_pipeline.sources.coverage", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--params", required=True, help="JSON file: sources, corpora, seed")
    parser.add_argument("--csv", required=True)
    parser.add_argument("--png", default=None)
    args = parser.parse_args(argv)
    logs.setup()
    build(json.loads(Path(args.params).read_text()), args.csv, args.png)


if __name__ == "__main__":
    main()
