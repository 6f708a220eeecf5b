"""The evaluation stage through real Snakemake runs."""

import csv

import numpy as np
import pytest
import torch
from helpers import read_json, snakemake

from dasheng_model.checkpoint import save_checkpoint
from dasheng_model.encoder import DashengEncoder
from dasheng_model.pretrained import random_encoder, save_hf
from dasheng_pipeline import cli
from dasheng_pipeline.evaluation.embeddings import load_split

pytestmark = pytest.mark.slow


def test_evaluation_of_small_tasks_through_snakemake(tmp_path):
    torch.manual_seed(0)
    ckpt = save_checkpoint(DashengEncoder("tiny"), tmp_path / "tiny.safetensors", seed=0)
    work = tmp_path / "work"
    work.mkdir()
    (work / "metrics.csv").write_text(
        "epoch,step,train_loss,val_loss\n0,1,1.2,\n0,2,1.0,\n1,3,0.9,0.95\n"
    )
    config = {
        "sources": {"demo": {"type": "demo", "clips": 2, "chunk_size": 2}},
        "evaluation": {
            "demo_tasks": {"tasks": ["demo_events", "demo_noise"], "speech": False, "scale": 0.4},
            "layers": {"tasks": ["demo_noise"]},
            "probe": {"hidden_layers": [1], "grid_points": 1, "max_epochs": 30, "patience": 3},
            "training_metrics": "metrics.csv",
        },
        "models": {
            "trained": {"type": "checkpoint", "path": str(ckpt)},
            "logmel": {"type": "logmel"},
        },
    }
    snakemake(work, config, "evaluate")
    out = work / "results/demo/eval"
    for model in ("trained", "logmel"):
        for task in ("demo_events",):
            meta = read_json(out / f"embeddings/{model}/{task}/meta.json")
            assert meta["dim"] == (192 if model == "trained" else 64) and meta["rejected"] == 0
            assert read_json(out / f"embeddings/{model}/{task}/rejects.json") == {"rejects": []}
            probe = read_json(out / f"probe/{model}/{task}.json")
            assert set(probe["provenance"]) == {"config_hash", "seed", "versions", "git_sha"}
            assert (work / f"results/demo/logs/eval/probe/{model}/{task}.log").is_file()
    events = read_json(out / "probe/trained/demo_events.json")
    assert events["primary_metric"] == "event_onset_200ms_fms" and len(events["folds"]) == 1
    assert 0.0 <= events["metrics"]["event_onset_200ms_fms"]["mean"] <= 1.0
    assert read_json(out / "knn/trained/demo_events.json")["skipped"] == "event task"
    with open(out / "results/scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    probe_rows = {(r["model"], r["task"], r["metric"]) for r in rows if r["method"] == "probe"}
    assert ("trained", "demo_events", "event_onset_200ms_fms") in probe_rows
    assert ("logmel", "demo_events", "segment_1s_er") in probe_rows
    assert "# Evaluation scores" in (out / "results/scores.md").read_text()
    assert "No evaluated task shares a name" in (out / "results/comparison.md").read_text()
    assert (
        "Probe protocol: HEAR except hidden_layers [1] (HEAR [1, 2]), grid_points 1 (HEAR 8)"
        in (out / "results/scores.md").read_text()
    )
    # the layer-wise table: the encoder's 6 blocks and the log-mel baseline (layer 0) on demo_noise
    with open(out / "results/layers.csv", newline="") as fh:
        layer_rows = {(r["model"], r["layer"], r["method"]) for r in csv.DictReader(fh)}
    assert layer_rows == {
        ("trained", str(k), m) for k in range(1, 7) for m in ("knn", "linear")
    } | {("logmel", "0", "knn"), ("logmel", "0", "linear")}
    assert "## demo_noise" in (out / "results/layers.md").read_text()
    for png in ("domains", "tasks", "loss_curve", "layers"):
        assert (out / f"plots/{png}.png").stat().st_size > 5000
    # nothing left to do on a rerun
    again = snakemake(work, config, "evaluate", "-n")
    assert "Nothing to be done" in again.stdout + again.stderr
    # the report holds the tables and plots
    snakemake(work, config, "evaluate", "--report", "report.html")
    html = (work / "report.html").read_text(errors="replace")
    assert (
        "scores.csv" in html
        and "domains.png" in html
        and "loss_curve.png" in html
        and "layers.png" in html
    )


def test_a_hear_task_folder_through_snakemake(tmp_path, hear_task):
    """A real HEAR task (5 folds, 44.1 kHz) named in evaluation.tasks: every fold probed and k-NN'd.
    The same random weights as an official .pt and as a Hugging Face folder give identical
    embeddings in the DAG, and `dasheng-pipeline evaluate` on the task gives the DAG's scores."""
    encoder = random_encoder("tiny", 7)
    official = tmp_path / "tiny.pt"
    torch.save(
        {"model": encoder.state_dict(), "config": {"embed_dim": 192, "depth": 6, "num_heads": 3}},
        official,
    )
    hf = save_hf(encoder, tmp_path / "tiny-hf")
    config = {
        "seed": 3,
        "sources": {"demo": {"type": "demo", "clips": 2, "chunk_size": 2}},
        "evaluation": {
            "demo_tasks": {"tasks": [], "speech": False},
            "tasks": {"spoken_digit": {"path": str(hear_task)}},
            "probe": {"hidden_layers": [1], "grid_points": 1, "max_epochs": 6, "patience": 2},
        },
        "models": {
            "logmel": {"type": "logmel"},
            "official": {"type": "checkpoint", "path": str(official)},
            "hf": {"type": "checkpoint", "path": str(hf)},
        },
    }
    snakemake(tmp_path, config, "evaluate")
    out = tmp_path / "results/demo/eval"
    digits = read_json(out / "probe/logmel/spoken_digit.json")
    assert (
        len(digits["folds"]) == 5
        and digits["folds"][2]["test"]
        and digits["split_mode"] == "new_split_kfold"
    )
    assert [f["valid"] for f in digits["folds"]] == [
        ["fold01"],
        ["fold02"],
        ["fold03"],
        ["fold04"],
        ["fold00"],
    ]
    with open(out / "results/scores.csv", newline="") as fh:
        knn = [
            r for r in csv.DictReader(fh) if r["method"] == "knn" and r["task"] == "spoken_digit"
        ]
    assert {r["model"] for r in knn} == {"logmel", "official", "hf"} and all(
        r["n_splits"] == "5" for r in knn
    )
    for split in ("fold00", "fold03"):
        a, b = (load_split(out / f"embeddings/{m}/spoken_digit", split) for m in ("official", "hf"))
        assert np.array_equal(a["clip"], b["clip"]) and np.array_equal(a["files"], b["files"])
    # the command line on the same task, with the workflow's config: the DAG's numbers
    cli_out = tmp_path / "cli"
    assert (
        cli.main(
            [
                "evaluate",
                str(hear_task),
                "--model",
                str(official),
                "--out",
                str(cli_out),
                "--config",
                str(tmp_path / "test-config.yaml"),
                "-q",
            ]
        )
        == 0
    )
    for method in ("probe", "knn"):
        dag = read_json(out / f"{method}/official/spoken_digit.json")
        mine = read_json(cli_out / f"{method}.json")
        assert mine["metrics"] == dag["metrics"] and mine["metrics"]
    dag_clip = load_split(out / "embeddings/official/spoken_digit", "fold00")
    assert np.array_equal(load_split(cli_out / "embeddings", "fold00")["clip"], dag_clip["clip"])


def test_a_missing_checkpoint_is_a_clear_error(tmp_path):
    config = {
        "sources": {"demo": {"type": "demo", "clips": 2, "chunk_size": 2}},
        "evaluation": {"demo_tasks": {"tasks": ["demo_noise"], "speech": False}},
        "models": {"official": {"type": "checkpoint", "path": "dasheng_base.pt"}},
    }
    proc = snakemake(tmp_path, config, "evaluate", "-n", check=False)
    assert proc.returncode != 0
    assert "dasheng_base.pt" in proc.stdout + proc.stderr
