"""Score tables, the comparison with the paper and X-ARES, and the plots (pipeline/evaluation/report/)."""

import csv
import json

import pytest
from PIL import Image

from dasheng_pipeline.common.provenance import stamp
from dasheng_pipeline.evaluation.report import plots, results


def _result(path, method, model, task, metric, mean, *, domain=None, mode="full", folds=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "method": method,
        "model": model,
        "task": task.split("-")[0],
        "task_mode": mode,
        "domain": domain,
        "primary_metric": metric,
        "metrics": {metric: {"mean": mean, "std": 0.01, "folds": [mean] * folds}},
        "provenance": stamp({"x": 1}, 0),
    }
    path.write_text(json.dumps(body))
    return path


@pytest.fixture
def fake_results(tmp_path):
    files = []
    for model, esc, pitch, noise in (
        ("trained", 0.80, 0.70, 0.90),
        ("random", 0.50, 0.40, 0.60),
        ("logmel", 0.60, 0.30, 0.95),
    ):
        files.append(
            _result(
                tmp_path / f"probe/{model}/esc50.json",
                "probe",
                model,
                "esc50",
                "top1_acc",
                esc,
                folds=5,
            )
        )
        # a task whose folder name differs: matched through task_name + mode
        files.append(
            _result(
                tmp_path / f"probe/{model}/nsynth5h.json",
                "probe",
                model,
                "nsynth_pitch",
                "pitch_acc",
                pitch,
                mode="5h",
            )
        )
        files.append(
            _result(
                tmp_path / f"probe/{model}/demo_noise.json",
                "probe",
                model,
                "demo_noise",
                "top1_acc",
                noise,
                domain="env",
                folds=4,
            )
        )
        files.append(
            _result(
                tmp_path / f"knn/{model}/esc50.json",
                "knn",
                model,
                "esc50",
                "top1_acc",
                esc - 0.1,
                folds=5,
            )
        )
    return tmp_path, files


def test_tables_and_comparison_with_the_paper(fake_results):
    root, files = fake_results
    params = {"seed": 0, "models": ["trained", "random", "logmel"], "tasks": {}}
    summary = results.run(files, root / "out", params)
    with open(root / "out/scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 12
    esc = next(
        r
        for r in rows
        if r["model"] == "trained" and r["task"] == "esc50" and r["method"] == "probe"
    )
    assert (
        esc["metric"],
        float(esc["score"]),
        esc["n_splits"],
        esc["domain"],
        esc["paper_task"],
    ) == ("top1_acc", 0.8, "5", "env", "esc50")
    assert esc["config_hash"] and esc["git_sha"]
    pitch = next(r for r in rows if r["task"] == "nsynth5h" and r["model"] == "logmel")
    assert pitch["paper_task"] == "nsynth_pitch_5h" and pitch["domain"] == "music"
    with open(root / "out/comparison.csv", newline="") as fh:
        comp = list(csv.DictReader(fh))
    t2 = {
        (r["model"], r["paper_model"]): r
        for r in comp
        if r["table"] == "table2_hear" and r["task"] == "esc50"
    }
    assert float(t2[("trained", "Dasheng-Base")]["score"]) == 80.0
    assert float(t2[("trained", "Dasheng-Base")]["paper_score"]) == 82.9  # the paper's Table 2, E50
    assert float(t2[("trained", "Dasheng-1.2B")]["paper_score"]) == 85.3
    t5 = {(r["model"], r["paper_model"]): r for r in comp if r["table"] == "table5_knn"}
    assert (
        float(t5[("trained", "Dasheng-Base")]["score"]) == 70.0
        and float(t5[("trained", "Dasheng-Base")]["paper_score"]) == 61.9
    )
    t4 = {
        (r["task"], r["model"], r["paper_model"]): r for r in comp if r["table"] == "table4_domains"
    }
    assert float(t4[("music", "trained", "Dasheng-Base")]["paper_score"]) == 84.01
    md = (root / "out/comparison.md").read_text()
    assert "Table 2: HEAR" in md and "| esc50 | E50 | 80.0 | 50.0 | 60.0 | 82.9 |" in md
    assert "1 of 4" in md and "Provenance: config hash" in md
    scores_md = (root / "out/scores.md").read_text()
    assert (
        "Did pre-training help?" in scores_md
        and "| esc50 | top1_acc | 80.0 | 50.0 | 60.0 | +30.0 | +20.0 |" in scores_md
    )
    # per-domain averages: env = mean(esc50, demo_noise), music = nsynth; average over the two domains
    avg = summary["domain_averages"]["trained"]
    assert avg["env"]["mean"] == pytest.approx(0.85) and avg["env"]["tasks"] == 2
    assert avg["average"]["mean"] == pytest.approx((0.85 + 0.70) / 2)
    assert set(summary["provenance"]) == {"config_hash", "seed", "versions", "git_sha"}


def test_comparison_is_empty_without_same_named_tasks(tmp_path):
    f = _result(
        tmp_path / "probe/logmel/demo_pitch.json",
        "probe",
        "logmel",
        "demo_pitch",
        "pitch_acc",
        0.5,
        domain="music",
    )
    results.run([f], tmp_path / "out", {"seed": 0, "models": [], "tasks": {}})
    assert "No evaluated task shares a name" in (tmp_path / "out/comparison.md").read_text()
    assert (tmp_path / "out/comparison.csv").read_text().strip() == ",".join(
        results.COMPARISON_COLUMNS
    )


def test_plots_are_pngs_with_provenance(fake_results, tmp_path):
    root, files = fake_results
    results.run(files, root / "out", {"seed": 0, "models": [], "tasks": {}})
    rows = plots._read_scores(root / "out/scores.csv")
    st = stamp({"plots": 1}, 0)
    plots.domain_bars(rows, ["trained", "random", "logmel"], tmp_path / "d.png", st)
    plots.task_radar(rows, ["trained", "random", "logmel"], tmp_path / "t.png", st)
    for name in ("d.png", "t.png"):
        img = Image.open(tmp_path / name)
        assert img.format == "PNG" and img.size[0] > 300
        assert json.loads(img.info["Description"])["provenance"]["config_hash"] == st["config_hash"]
