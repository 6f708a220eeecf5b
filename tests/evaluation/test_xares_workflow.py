"""X-ARES tasks through a real Snakemake run: a generated X-ARES demo task (k folds) and an X-ARES
frame task (DESED-like, train/valid/test shards) named in evaluation.tasks."""

import csv

import pytest
from helpers import read_json, snakemake

from dasheng_pipeline import cli
from dasheng_pipeline.evaluation.tasks import demo as demo_tasks

pytestmark = pytest.mark.slow


def test_xares_tasks_through_snakemake(tmp_path):
    events = tmp_path / "desed_like"
    demo_tasks.generate_xares("demo_events", events, seed=5, scale=0.2)
    (tmp_path / "metrics.csv").write_text(
        "epoch,step,train_loss,val_loss\n0,1,1.2,\n1,2,0.9,0.95\n"
    )
    config = {
        "sources": {"demo": {"type": "demo", "clips": 2, "chunk_size": 2}},
        "evaluation": {
            "demo_tasks": {
                "tasks": ["demo_noise"],
                "xares": ["demo_noise"],
                "speech": False,
                "scale": 0.2,
            },
            "probe": {"hidden_layers": [1], "grid_points": 1, "max_epochs": 6, "patience": 2},
            "xares": {"mlp": {"epochs": 3}},
            "training_metrics": "metrics.csv",
            "tasks": {
                "desed_like": {
                    "path": str(events),
                    "format": "xares",
                    "kind": "frame",
                    "weight": 7,
                    "splits": {s: f"wds-audio-{s}" for s in ("train", "valid", "test")},
                    "protocols": ["xares_mlp", "xares_knn"],
                }
            },
        },
        "models": {"logmel": {"type": "logmel"}},
    }
    snakemake(tmp_path, config, "evaluate")
    out = tmp_path / "results/demo/eval"
    noise = read_json(out / "xares_knn/logmel/demo_noise_xares.json")
    assert noise["primary_metric"] == "accuracy" and len(noise["folds"]) == 4
    assert [f["valid"] == f["test"] for f in noise["folds"]] == [True] * 4  # X-ARES's rotation
    mlp = read_json(out / "xares_mlp/logmel/demo_noise_xares.json")
    assert 0.0 <= mlp["metrics"]["accuracy"]["mean"] <= 1.0 and mlp["config"]["mlp"]["epochs"] == 3
    frame = read_json(out / "xares_mlp/logmel/desed_like.json")
    assert (
        frame["kind"] == "frame"
        and frame["primary_metric"] == "segmentf1_macro"
        and frame["weight"] == 7
    )
    assert read_json(out / "xares_knn/logmel/desed_like.json")["skipped"] == "frame task"
    assert read_json(out / "tasks/demo_noise_xares/rejects.json") == {"rejects": []}
    # the HEAR demo task still runs HEAR's probe and the paper's k-NN
    assert (out / "probe/logmel/demo_noise.json").is_file() and (
        out / "knn/logmel/demo_noise.json"
    ).is_file()
    with open(out / "results/xares.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    tasks = {(r["protocol"], r["task"]) for r in rows}
    assert {
        ("xares_mlp", "demo_noise_xares"),
        ("xares_mlp", "desed_like"),
        ("xares_knn", "demo_noise_xares"),
        ("xares_mlp", "weighted_average"),
    } <= tasks
    md = (out / "results/xares.md").read_text()
    assert "validation and test" in md and "weighted average" in md
    again = snakemake(tmp_path, config, "evaluate", "-n")
    assert "Nothing to be done" in again.stdout + again.stderr
    # the command line on the same X-ARES shards, with the workflow's config: the DAG's numbers
    cli_out = tmp_path / "cli"
    assert (
        cli.main(
            [
                "evaluate",
                str(events),
                "--model",
                "logmel",
                "--out",
                str(cli_out),
                "--config",
                str(tmp_path / "test-config.yaml"),
                "--xares-mlp",
                "-q",
            ]
        )
        == 0
    )
    assert read_json(cli_out / "xares_mlp.json")["metrics"] == frame["metrics"]
