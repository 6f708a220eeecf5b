"""Score tables and the comparison with the paper: ``python -m dasheng_pipeline.evaluation.report.results``.

Reads the probe, k-NN and X-ARES result JSONs (``<method>/<model>/<task>.json``, the file stem is the
task's name in the config) and writes:

- ``scores.csv``: one row per (model, task, method, metric): mean and std over splits (0–1 scale,
  as the metrics return them), the number of splits, whether the metric is the task's primary
  one, the task's domain and paper name, and the provenance (config hash, git SHA);
- ``scores.md``: the same as tables (×100, as the paper prints them), per-domain averages of the
  primary probe scores (the paper's Table 4 on our tasks), and, where both exist, the difference
  between the trained encoder and its random-init twin (did pre-training help?);
- ``comparison.csv`` / ``comparison.md``: our scores next to the paper's for every task with the
  same name (Table 2: HEAR probe; Table 5: k-NN), and our per-domain averages next to Table 4;
- ``xares.csv`` / ``xares.md``: the X-ARES protocols' scores per task and model next to X-ARES's
  published dasheng-base scores (``config/xares_results.csv``), and X-ARES's weighted averages;
- ``summary.json``: all of it plus the provenance stamp.

The paper's numbers are data: ``config/paper_results.csv`` (table, task, column, model, score).
A task matches a paper task when its config name, ``<task_name>_<mode>`` or ``task_name`` (from its
``task_metadata.json``) equals the paper's task name (e.g. ``esc50``, ``nsynth_pitch_5h``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections import defaultdict
from pathlib import Path

from dasheng_pipeline.common import atomic, logs, provenance
from dasheng_pipeline.evaluation.metrics import LOWER_IS_BETTER

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[3]
PAPER_CSV = REPO / "config" / "paper_results.csv"

# The paper's grouping of the HEAR tasks into domains (Section 3.1.2 and Table 4; Gunshot
# triangulation counts as environment, which reproduces Table 4's averages from Table 2).
PAPER_DOMAINS = {
    "dcase2016_task2": "env",
    "esc50": "env",
    "fsd50k": "env",
    "gunshot_triangulation": "env",
    "crema_d": "speech",
    "libricount": "speech",
    "speech_commands_5h": "speech",
    "speech_commands_full": "speech",
    "vocal_imitation": "speech",
    "vox_lingua_top10": "speech",
    "beijing_opera": "music",
    "gtzan_genre": "music",
    "gtzan_music_speech": "music",
    "maestro": "music",
    "mridangam_stroke": "music",
    "mridangam_tonic": "music",
    "nsynth_pitch_50h": "music",
    "nsynth_pitch_5h": "music",
}
DOMAINS = ("env", "speech", "music")
DOMAIN_TITLES = {
    "env": "Env",
    "speech": "Speech",
    "music": "Music",
    "other": "Other",
    "average": "Average",
}
DASHENG = ("Dasheng-Base", "Dasheng-0.6B", "Dasheng-1.2B")


def read_published(path: str | Path) -> list[dict]:
    """Published scores (``config/paper_results.csv``, ``config/xares_results.csv``): the CSV's
    rows with ``score`` a float, or None where the source prints none ('' or '-')."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["score"] = float(r["score"]) if r["score"] not in ("", "-") else None
    return rows


def paper_name(
    key: str, result: dict, paper_tasks: set[str], override: str | None = None
) -> str | None:
    if override:
        return override
    candidates = [key]
    meta_name = result.get("task")
    mode = result.get("task_mode")
    if meta_name and mode:
        candidates.append(f"{meta_name}_{mode}")
    if meta_name:
        candidates.append(meta_name)
    return next((c for c in candidates if c in paper_tasks), None)


def load_results(paths: list[str | Path]) -> list[dict]:
    out = []
    for p in paths:
        p = Path(p)
        with open(p, encoding="utf-8") as fh:
            r = json.load(fh)
        r["key"] = p.stem
        out.append(r)
    return out


def build_rows(results: list[dict], tasks_cfg: dict, paper: list[dict]) -> list[dict]:
    paper_tasks = {r["task"] for r in paper}
    rows = []
    for r in results:
        cfg = tasks_cfg.get(r["key"], {}) or {}
        pname = paper_name(r["key"], r, paper_tasks, cfg.get("paper_name"))
        domain = (
            cfg.get("domain") or r.get("domain") or PAPER_DOMAINS.get(pname or "", None) or "other"
        )
        stamp = r.get("provenance", {})
        for metric, v in r.get("metrics", {}).items():
            rows.append(
                {
                    "model": r["model"],
                    "task": r["key"],
                    "method": r["method"],
                    "metric": metric,
                    "primary": metric == r.get("primary_metric"),
                    "score": v.get("mean"),
                    "std": v.get("std"),
                    "n_splits": len(v.get("folds", [])),
                    "domain": domain,
                    "paper_task": pname or "",
                    "config_hash": stamp.get("config_hash", ""),
                    "git_sha": stamp.get("git_sha", ""),
                }
            )
    rows.sort(key=lambda x: (x["method"], x["task"], x["model"], not x["primary"], x["metric"]))
    return rows


def _fmt(score, std=None, scale=100.0) -> str:
    if score is None or (isinstance(score, float) and math.isnan(score)):
        return "–"
    text = f"{score * scale:.1f}"
    if std is not None and not (isinstance(std, float) and math.isnan(std)) and std > 0:
        text += f" ± {std * scale:.1f}"
    return text


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    def esc(x):
        return str(x).replace("|", "\\|")

    lines = [
        "| " + " | ".join(esc(h) for h in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def domain_averages(rows: list[dict], models: list[str]) -> dict[str, dict[str, tuple[float, int]]]:
    """Per model and domain: mean primary probe score (higher-is-better metrics) and task count."""
    acc: dict = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if (
            r["method"] == "probe"
            and r["primary"]
            and r["metric"] not in LOWER_IS_BETTER
            and r["score"] is not None
        ):
            acc[r["model"]][r["domain"]].append(r["score"])
    out = {}
    for m in models:
        per = {d: (sum(v) / len(v), len(v)) for d, v in acc[m].items() if v}
        named = [per[d][0] for d in DOMAINS if d in per]
        if named:
            per["average"] = (sum(named) / len(named), len(named))
        out[m] = per
    return out


METHOD_TITLES = {
    "probe": "MLP probe (HEAR protocol)",
    "knn": "k-NN (k = 10, cosine)",
    "xares_mlp": "X-ARES MLP (LayerNorm + Linear, 10 epochs)",
    "xares_knn": "X-ARES k-NN (k = 10, softmax(similarity / 0.07) votes)",
}
XARES_CSV = REPO / "config" / "xares_results.csv"
XARES_PROTOCOLS = {"xares_mlp": "mlp", "xares_knn": "knn"}
XARES_CAPTION = (
    "X-ARES protocols (X-ARES 0.1.3): MLP = LayerNorm + Linear on the clip embedding (frame tasks: on every "
    "frame), Adam 1e-3 with cosine decay to 0.1×, 10 epochs, batch 32, the best validation epoch kept; k-NN = "
    "k = 10 over the train split, votes weighted by softmax(similarity / 0.07), multiclass tasks only. "
    "**k-fold tasks: as X-ARES does, each fold is held out in turn and serves as both validation and test "
    "set** (the MLP's best epoch is chosen on the test fold), the other folds train; scores are averaged over "
    "folds. Metrics: accuracy, mAP (multilabel), segment F1 macro (frame). Scores ×100. The weighted average "
    "is X-ARES's: Σ score × weight / Σ weight over the tasks shown, weight = X-ARES's per-task weight (its "
    "test size; `weight` in the config, else our test clips). Published = X-ARES's dasheng-base "
    "(`config/xares_results.csv`); its weighted average covers all its public tasks, so it is comparable "
    "only when all of them are evaluated here.\n"
)


def _xares_task(
    task: str,
    by_model: dict[str, dict],
    models: list[str],
    proto: str,
    pub: dict,
    tasks_cfg: dict,
    sums: dict[str, list],
) -> tuple[list[str], list[dict]]:
    """One task's table row and long-form rows under one X-ARES protocol; adds its weighted
    scores to ``sums`` (model → [Σ score × weight, Σ weight])."""
    method = f"xares_{proto}"
    any_r = next(iter(by_model.values()))
    xname = (tasks_cfg.get(task) or {}).get("xares_name") or any_r.get("xares_name") or task
    published_score = pub.get((xname, proto))
    if published_score is None:
        published_score = pub.get((task, proto))
    weight = any_r.get("weight")
    cells, rows = [task, any_r["primary_metric"], str(weight)], []
    for m in models:
        r = by_model.get(m)
        v = r["metrics"][r["primary_metric"]] if r else None
        cells.append(_fmt(v["mean"], v["std"]) if v else "–")
        if v and v["mean"] is not None and weight:
            sums[m][0] += v["mean"] * weight
            sums[m][1] += weight
        rows.append(
            {
                "protocol": method,
                "task": task,
                "xares_task": xname,
                "metric": any_r["primary_metric"],
                "model": m,
                "score": None if not v else v["mean"],
                "weight": weight,
                "published_dasheng_base": published_score,
            }
        )
    cells.append(_fmt(published_score))
    return cells, rows


def _xares_average(
    proto: str, models: list[str], pub: dict, sums: dict[str, list]
) -> tuple[list[str], list[dict]]:
    """The weighted averages' table row and long-form rows under one X-ARES protocol."""
    published = pub.get(("weighted_average_public", proto))
    mean = {m: sums[m][0] / sums[m][1] if sums[m][1] else None for m in models}
    cells = [
        "**weighted average**",
        "",
        str(sums[models[0]][1] if models else ""),
        *[_fmt(mean[m]) if sums[m][1] else "–" for m in models],
        _fmt(published) + " (all public tasks)",
    ]
    rows = [
        {
            "protocol": f"xares_{proto}",
            "task": "weighted_average",
            "xares_task": "weighted_average_public",
            "metric": "weighted_mean",
            "model": m,
            "score": mean[m],
            "weight": sums[m][1],
            "published_dasheng_base": published,
        }
        for m in models
    ]
    return cells, rows


def xares_tables(
    results: list[dict], models: list[str], published: list[dict], tasks_cfg: dict
) -> tuple[list[dict], str]:
    """Per X-ARES protocol: every task's score per model next to X-ARES's published dasheng-base score,
    and the weighted averages. Returns long-form rows and the Markdown document."""
    pub = {(r["task"], r["protocol"]): r["score"] for r in published}
    out_rows: list[dict] = []
    md = ["# X-ARES protocols\n\n", XARES_CAPTION]
    for method, proto in XARES_PROTOCOLS.items():
        mine = [r for r in results if r.get("method") == method and r.get("metrics")]
        md.append(f"\n## {METHOD_TITLES[method]}\n\n")
        if not mine:
            md.append("No task ran this protocol.\n")
            continue
        by_task: dict = defaultdict(dict)
        for r in mine:
            by_task[r["key"]][r["model"]] = r
        body, sums = [], {m: [0.0, 0] for m in models}
        for task in sorted(by_task):
            cells, rows = _xares_task(task, by_task[task], models, proto, pub, tasks_cfg, sums)
            body.append(cells)
            out_rows += rows
        cells, rows = _xares_average(proto, models, pub, sums)
        body.append(cells)
        out_rows += rows
        md.append(
            markdown_table(["task", "metric", "weight", *models, "published dasheng-base"], body)
        )
    return out_rows, "".join(md)


XARES_COLUMNS = [
    "protocol",
    "task",
    "xares_task",
    "metric",
    "model",
    "score",
    "weight",
    "published_dasheng_base",
]


def _method_table(rows: list[dict], models: list[str], method: str, title: str) -> str:
    """One method's scores: a row per (task, metric), a column per model ('' without scores)."""
    mrows = [r for r in rows if r["method"] == method]
    if not mrows:
        return ""
    keys = sorted(
        {(r["task"], r["metric"], r["primary"], r["domain"]) for r in mrows},
        key=lambda k: (k[3], k[0], not k[2], k[1]),
    )
    lookup = {(r["task"], r["metric"], r["model"]): r for r in mrows}
    body = []
    for task, metric, primary, domain in keys:
        cells = []
        for m in models:
            r = lookup.get((task, metric, m))
            cells.append(_fmt(r["score"], r["std"]) if r else "–")
        body.append([task, domain, metric + (" (primary)" if primary else "")] + cells)
    return f"\n## {title}\n\n" + markdown_table(["task", "domain", "metric"] + models, body)


def _domain_table(rows: list[dict], models: list[str]) -> str:
    """The per-domain averages of the primary probe scores ('' without any)."""
    avgs = domain_averages(rows, models)
    present = [d for d in (*DOMAINS, "other", "average") if any(d in avgs[m] for m in models)]
    if not present:
        return ""
    body = [
        [m]
        + [(_fmt(avgs[m][d][0]) + f" ({avgs[m][d][1]})") if d in avgs[m] else "–" for d in present]
        for m in models
    ]
    return (
        "\n## Per-domain averages of the primary probe scores (number of tasks)\n\n"
        "As the paper's Table 4: the mean over a domain's tasks; Average = mean of the domains.\n\n"
        + markdown_table(["model"] + [DOMAIN_TITLES[d] for d in present], body)
    )


EFFECT_LABELS = {
    "probe": "primary probe score",
    "knn": "k-NN accuracy",
    "xares_mlp": "X-ARES MLP score",
    "xares_knn": "X-ARES k-NN accuracy",
}
EFFECT_HEADER = [
    "task",
    "metric",
    "trained",
    "random-init",
    "log-mel",
    "trained − random",
    "trained − log-mel",
]


def _effect_table(rows: list[dict], models: list[str], method: str) -> str:
    """Did pre-training help on one method ('' when trained and a baseline are not both there)."""
    helped = pretraining_effect(rows, models, method)
    if not helped:
        return ""
    return (
        f"\n## Did pre-training help? ({METHOD_TITLES[method]})\n\n"
        f"The trained encoder's {EFFECT_LABELS[method]} minus its random-init twin's, and minus the log-mel "
        "baseline's (×100; positive = the trained encoder is better); the last row is the "
        "mean over tasks.\n\n" + markdown_table(EFFECT_HEADER, helped)
    )


def scores_markdown(
    rows: list[dict], models: list[str], stamp: dict, protocols: list[str] | None = None
) -> str:
    parts = [
        "# Evaluation scores\n",
        "Scores ×100 (mean ± std over splits; k-fold tasks average their folds). "
        "Probe: HEAR's MLP protocol; k-NN: k = 10, cosine, accuracy. "
        "`segment_1s_er` is an error rate (lower is better); everything else is higher-is-better.\n",
    ]
    if protocols:
        parts.append("\nProbe protocol: " + "; ".join(protocols) + ".\n")
    parts += [_method_table(rows, models, m, title) for m, title in METHOD_TITLES.items()]
    parts.append(_domain_table(rows, models))
    parts += [_effect_table(rows, models, method) for method in EFFECT_LABELS]
    parts.append(_provenance_md(stamp))
    return "".join(parts)


def pretraining_effect(
    rows: list[dict], models: list[str], method: str = "probe"
) -> list[list[str]]:
    """Rows comparing 'trained' with 'random' and 'logmel' on one method's primary scores (when
    those models are evaluated), and a last row with the means over tasks."""
    if "trained" not in models or not ({"random", "logmel"} & set(models)):
        return []
    lookup = {(r["task"], r["model"]): r for r in rows if r["method"] == method and r["primary"]}
    out, scores = [], {"trained": [], "random": [], "logmel": []}
    for task in sorted({r["task"] for r in rows if r["method"] == method}):
        t = lookup.get((task, "trained"))
        if not t or t["score"] is None:
            continue
        sign = -1.0 if t["metric"] in LOWER_IS_BETTER else 1.0
        cells = [task, t["metric"], _fmt(t["score"])]
        others = [lookup.get((task, "random")), lookup.get((task, "logmel"))]
        cells += [_fmt(o["score"]) if o else "–" for o in others]
        cells += [
            f"{sign * (t['score'] - o['score']) * 100:+.1f}"
            if o and o["score"] is not None
            else "–"
            for o in others
        ]
        out.append(cells)
        for name, row in (("trained", t), ("random", others[0]), ("logmel", others[1])):
            # signed so that higher is better for every metric; the mean row compares these
            scores[name].append(sign * row["score"] if row and row["score"] is not None else None)
    if len(out) > 1:
        mean = {k: (sum(v) / len(v) if v and None not in v else None) for k, v in scores.items()}
        cells = ["mean (higher is better)", "", _fmt(mean["trained"])]
        cells += [_fmt(mean[k]) if mean[k] is not None else "–" for k in ("random", "logmel")]
        cells += [
            f"{(mean['trained'] - mean[k]) * 100:+.1f}" if mean[k] is not None else "–"
            for k in ("random", "logmel")
        ]
        out.append(cells)
    return out


def _provenance_md(stamp: dict) -> str:
    return (
        f"\n---\nProvenance: config hash `{stamp.get('config_hash')}`, seed {stamp.get('seed')}, "
        f"git `{stamp.get('git_sha')}`.\n"
    )


def _paper_models(paper_rows: list[dict]) -> list[str]:
    """A paper table's models, Dasheng's first."""
    names = list(dict.fromkeys(p["model"] for p in paper_rows))
    return [m for m in names if m in DASHENG] + [m for m in names if m not in DASHENG]


def _paper_table(
    rows: list[dict], models: list[str], paper_rows: list[dict], table: str, method: str, comp
) -> str:
    """Our primary scores of one method next to a paper table's, for the same-named tasks;
    appends the long-form rows to ``comp``."""
    ours = [
        r
        for r in rows
        if r["method"] == method
        and r["primary"]
        and r["paper_task"]
        and any(p["task"] == r["paper_task"] for p in paper_rows)
    ]
    tasks = sorted({r["paper_task"] for r in ours})
    if not tasks:
        return "No evaluated task shares a name with this table's tasks.\n"
    show = _paper_models(paper_rows)
    lookup = {(p["task"], p["model"]): p for p in paper_rows}
    body = []
    for task in tasks:
        mine = {r["model"]: r for r in ours if r["paper_task"] == task}
        column = next(p["column"] for p in paper_rows if p["task"] == task)
        for m, r in mine.items():
            for pm in show:
                p = lookup.get((task, pm))
                comp.append(
                    {
                        "table": table,
                        "task": task,
                        "column": column,
                        "metric": r["metric"],
                        "model": m,
                        "score": None if r["score"] is None else round(r["score"] * 100, 2),
                        "paper_model": pm,
                        "paper_score": p["score"] if p else None,
                    }
                )
        cells = [task, column] + [_fmt(mine[m]["score"]) if m in mine else "–" for m in models]
        cells += [
            f"{lookup[(task, pm)]['score']:.1f}"
            if (task, pm) in lookup and lookup[(task, pm)]["score"] is not None
            else "–"
            for pm in show
        ]
        body.append(cells)
    return markdown_table(["task", "paper column"] + [f"ours: {m}" for m in models] + show, body)


def _domain_row(d: str, tasks_d: list[str], t2: list[dict], models, by_table, comp) -> list[str]:
    """One domain's row of Table 4: our averages over its matched tasks, the paper's over the
    same tasks (Table 2) and the paper's Table 4; appends the long-form rows to ``comp``."""
    t4 = {(p["task"], p["model"]): p["score"] for p in by_table["table4_domains"]}
    total = sum(1 for v in PAPER_DOMAINS.values() if v == d)
    cells = [DOMAIN_TITLES[d], f"{len(tasks_d)} of {total}"]
    for m in models:
        vals = [
            r["score"]
            for r in t2
            if r["model"] == m and r["paper_task"] in tasks_d and r["score"] is not None
        ]
        avg = sum(vals) / len(vals) if len(vals) == len(tasks_d) else None
        cells.append(_fmt(avg))
        if avg is not None:
            comp += [
                {
                    "table": "table4_domains",
                    "task": d,
                    "column": DOMAIN_TITLES[d],
                    "metric": "mean primary",
                    "model": m,
                    "score": round(avg * 100, 2),
                    "paper_model": pm,
                    "paper_score": t4.get((d, pm)),
                }
                for pm in DASHENG
            ]
    for pm in DASHENG:
        same = [
            p["score"]
            for p in by_table["table2_hear"]
            if p["model"] == pm and p["task"] in tasks_d and p["score"] is not None
        ]
        cells.append(f"{sum(same) / len(same):.1f}" if len(same) == len(tasks_d) else "–")
        cells.append(f"{t4[(d, pm)]:.2f}" if (d, pm) in t4 and t4[(d, pm)] is not None else "–")
    return cells


def _domain_comparison(rows: list[dict], models: list[str], by_table, comp) -> str:
    """Table 4: per-domain averages over the matched HEAR tasks."""
    t2 = [
        r
        for r in rows
        if r["method"] == "probe" and r["primary"] and r["paper_task"] in PAPER_DOMAINS
    ]
    if not t2:
        return "No evaluated task is one of the paper's 18 HEAR tasks, so no domain average is comparable.\n"
    body = []
    for d in DOMAINS:
        tasks_d = sorted({r["paper_task"] for r in t2 if PAPER_DOMAINS[r["paper_task"]] == d})
        if tasks_d:
            body.append(_domain_row(d, tasks_d, t2, models, by_table, comp))
    header = ["domain", "tasks"] + [f"ours: {m}" for m in models]
    for pm in DASHENG:
        header += [f"{pm} (same tasks)", f"{pm} (Table 4)"]
    return markdown_table(header, body)


def build_comparison(
    rows: list[dict], models: list[str], paper: list[dict]
) -> tuple[list[dict], str]:
    """Long-form comparison rows and the Markdown document."""
    comp: list[dict] = []
    md = [
        "# Comparison with the paper\n",
        "Our scores (×100) next to the paper's for tasks with the same name. The paper's models ran on "
        "the full HEAR tasks; ours on whatever data the config names, so only same-named tasks are compared.\n",
    ]
    by_table = defaultdict(list)
    for p in paper:
        by_table[p["table"]].append(p)
    for table, method, title in (
        ("table2_hear", "probe", "Table 2: HEAR (MLP probe)"),
        ("table5_knn", "knn", "Table 5: k-NN (k = 10)"),
    ):
        md.append(f"\n## {title}\n\n")
        md.append(_paper_table(rows, models, by_table[table], table, method, comp))
    md.append("\n## Table 4: domain averages\n\n")
    md.append(_domain_comparison(rows, models, by_table, comp))
    return comp, "".join(md)


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})
    with atomic.atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(buf.getvalue())


SCORE_COLUMNS = [
    "model",
    "task",
    "method",
    "metric",
    "primary",
    "score",
    "std",
    "n_splits",
    "domain",
    "paper_task",
    "config_hash",
    "git_sha",
]
COMPARISON_COLUMNS = [
    "table",
    "task",
    "column",
    "metric",
    "model",
    "score",
    "paper_model",
    "paper_score",
]


def run(
    inputs: list[str | Path],
    out_dir: str | Path,
    params: dict,
    paper_csv: str | Path = PAPER_CSV,
    xares_csv: str | Path = XARES_CSV,
) -> dict:
    out_dir = Path(out_dir)
    results = load_results(inputs)
    paper = read_published(paper_csv)
    tasks_cfg = params["tasks"]
    models = list(params["models"] or dict.fromkeys(r["model"] for r in results))
    rows = build_rows(results, tasks_cfg, paper)
    stamp = provenance.stamp(params, params["seed"])
    for r in rows:  # the table's own stamp where a result has none
        r["config_hash"] = r["config_hash"] or stamp["config_hash"]
        r["git_sha"] = r["git_sha"] or stamp["git_sha"]
    comp, comp_md = build_comparison(rows, models, paper)
    write_csv(out_dir / "scores.csv", rows, SCORE_COLUMNS)
    protocols = sorted(
        {r["protocol"] for r in results if r["method"] == "probe" and r.get("protocol")}
    )
    atomic.write_bytes(
        out_dir / "scores.md", scores_markdown(rows, models, stamp, protocols).encode()
    )
    write_csv(out_dir / "comparison.csv", comp, COMPARISON_COLUMNS)
    atomic.write_bytes(out_dir / "comparison.md", (comp_md + _provenance_md(stamp)).encode())
    xrows, xmd = xares_tables(results, models, read_published(xares_csv), tasks_cfg)
    write_csv(out_dir / "xares.csv", xrows, XARES_COLUMNS)
    atomic.write_bytes(out_dir / "xares.md", (xmd + _provenance_md(stamp)).encode())
    summary = {
        "models": models,
        "scores": rows,
        "comparison": comp,
        "xares": xrows,
        "domain_averages": {
            m: {d: {"mean": v[0], "tasks": v[1]} for d, v in per.items()}
            for m, per in domain_averages(rows, models).items()
        },
        "provenance": stamp,
    }
    atomic.write_json(out_dir / "summary.json", summary)
    log.info(
        f"{len(results)} result files, {len(rows)} scores, {len(comp)} comparison rows → {out_dir}"
    )
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = logs.entry_parser("dasheng_pipeline.evaluation.report.results", __doc__)
    parser.add_argument("--inputs", nargs="+", required=True, help="probe and k-NN result JSONs")
    parser.add_argument(
        "--params",
        required=True,
        help="JSON: seed, models (order), tasks {name: {domain, paper_name, xares_name}}",
    )
    parser.add_argument("--paper", default=str(PAPER_CSV), help="the paper's numbers (CSV)")
    parser.add_argument("--xares", default=str(XARES_CSV), help="X-ARES's published numbers (CSV)")
    parser.add_argument("--out-dir", required=True)
    args = parser.parse_args(argv)
    logs.setup()
    run(args.inputs, args.out_dir, json.loads(args.params), args.paper, args.xares)


if __name__ == "__main__":
    main()
