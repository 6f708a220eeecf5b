"""MAE pre-training with Ray Train: schedule, averaging, loader, input checks, and real runs of
two CPU workers on demo shards (loss falls, a lost worker). kill -9 of training at random points and
its resume to the same weights is tested through the DAG in tests/faults/test_fault_kill.py."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from helpers import read_json, snakemake

from dasheng_pipeline.common import atomic
from dasheng_pipeline.features import shards
from dasheng_pipeline.training import loader, schedule
from dasheng_pipeline.training.averaging import average_state_dicts

DATA_CONFIG = {
    "sources": {
        "demo": {"type": "demo", "clips": 32, "chunk_size": 16, "min_s": 4.0, "max_s": 10.0},
        "demo_valid": {
            "type": "demo",
            "stream": 1000,
            "clips": 8,
            "chunk_size": 8,
            "min_s": 4.0,
            "max_s": 10.0,
        },
    }
}
TRAINING = {
    "size": "tiny",
    "epochs": 3,
    "batches_per_epoch": 4,
    "global_batch": 8,
    "lr": 1e-3,
    "warmup_epochs": 1,
    "validation_sources": ["demo_valid"],
    "validation_rows": 8,
    "workers": 2,
    "use_gpu": False,
    "cpus_per_worker": 1,
    "loader_workers": 0,
    "shuffle_buffer": 16,
    "log_every": 1,
    "object_store_mb": 128,
    "decoder": None,
    "weight_decay": 0.01,
    "final_lr_fraction": 0.1,
    "optimizer": "adamw8bit",
    "mask_ratio": 0.75,
    "precision": "auto",
    "compile": False,
    "keep_best": 4,
    "average_best": 2,
    "max_failures": 2,
    "verify_shards": True,
    "nodes": 1,
    "gpus_per_node": 0,
    "mem_mb": 4000,
    "runtime_min": 30,
    "total_runtime_min": 30,
    "checkpoint_every_min": 0,
    "signal_lead_s": 0,
    "quick_checks": {"every_epochs": 0, "tasks": [], "k": 10, "layers": "all"},
    "quick_sets": [],
}


# ----------------------------------------------------------------------------- units


def test_schedule_values():
    lr = lambda step: schedule.learning_rate(
        step, 3e-4, warmup_steps=100, total_steps=1100, final_fraction=0.1
    )
    assert lr(0) == 0.0
    assert lr(50) == pytest.approx(1.5e-4)
    assert lr(100) == pytest.approx(3e-4)
    assert lr(600) == pytest.approx(3e-5 + 2.7e-4 * 0.5)  # half way through the cosine
    assert lr(1100) == pytest.approx(3e-5)
    assert lr(5000) == pytest.approx(3e-5)  # stays at the floor
    assert all(lr(s) >= lr(s + 1) for s in range(100, 1100))


def test_checkpoint_average_is_the_mean_of_the_weights():
    sds = [{"w": torch.full((2, 2), float(v)), "n": torch.tensor(v)} for v in (1, 2, 6)]
    avg = average_state_dicts(sds)
    assert torch.equal(avg["w"], torch.full((2, 2), 3.0))
    assert int(avg["n"]) == 1  # integer buffers (num_batches_tracked) come from the first
    with pytest.raises(ValueError, match="different keys"):
        average_state_dicts([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}])


def _tagged_shards(folder: Path, n_shards=3, rows=10) -> list[str]:
    """Shards whose mel holds the row's global number, so batches can be traced to rows."""
    paths = []
    for s in range(n_shards):
        path = folder / f"s{s}.parquet"
        w = shards.ShardWriter(path, 64, 8, {}, 5, "none")
        for r in range(rows):
            tag = s * rows + r
            w.add(f"c{tag}", "x", 0, 0.0, 8 - r % 3, [], np.full((64, 8), tag, np.float32))
        w.close()
        paths.append(str(path))
    return paths


def _rows(batches) -> list[int]:
    return [int(m[0, 0]) for b in batches for m in b["mel"].float()]


def test_loader_is_deterministic_per_epoch_and_splits_parts(tmp_path):
    parts = loader.parts_of(_tagged_shards(tmp_path))
    assert len(parts) == 6 and all(p.rows == 5 for p in parts)
    make = lambda epoch, rank: loader.TrainBatches(
        parts, 3, 2, seed=7, epoch=epoch, rank=rank, world_size=2, shuffle_buffer=4
    )
    a, b = list(make(0, 0)), list(make(0, 0))
    assert _rows(a) == _rows(b)  # same (seed, epoch, rank): same batches
    assert _rows(make(1, 0)) != _rows(a)  # another epoch: another order
    assert not set(_rows(make(0, 0))) & set(
        _rows(make(0, 1))
    )  # ranks read disjoint parts in a pass
    batch = a[0]
    assert batch["mel"].dtype == torch.float16 and batch["mel"].shape == (3, 64, 8)
    tags = [int(m[0, 0]) for m in batch["mel"].float()]
    assert batch["valid_frames"].tolist() == [
        8 - (t % 10) % 3 for t in tags
    ]  # valid frames travel with rows


def test_loader_splits_an_epoch_between_dataloader_workers(tmp_path):
    parts = loader.parts_of(_tagged_shards(tmp_path))
    data = loader.TrainBatches(parts, 2, 5, seed=1, epoch=0, shuffle_buffer=2)
    one = list(torch.utils.data.DataLoader(data, batch_size=None, num_workers=2))
    again = list(torch.utils.data.DataLoader(data, batch_size=None, num_workers=2))
    assert len(one) == 5 and _rows(one) == _rows(again)
    assert [loader.split_count(5, 2, i) for i in (0, 1)] == [3, 2]


def test_loader_resumes_inside_an_epoch_with_the_batches_that_come_next(tmp_path):
    """A resumed epoch (skip = batches already consumed) yields exactly the rest of the full epoch,
    with one stream or with DataLoader workers (whose round robin restarts at worker 0)."""
    parts = loader.parts_of(_tagged_shards(tmp_path))
    for workers in (0, 2):
        make = lambda skip, workers=workers: list(
            torch.utils.data.DataLoader(
                loader.TrainBatches(
                    parts, 3, 7, seed=3, epoch=1, rank=1, world_size=2, shuffle_buffer=4, skip=skip
                ),
                batch_size=None,
                num_workers=workers,
            )
        )
        full = make(0)
        for skip in (1, 4, 7):
            rest = make(skip)
            assert [_rows([b]) for b in rest] == [_rows([b]) for b in full[skip:]], (workers, skip)
            assert all(
                torch.equal(a["valid_frames"], b["valid_frames"]) for a, b in zip(rest, full[skip:])
            )


def test_step_checkpoints_are_checked_and_a_damaged_one_is_skipped(tmp_path, caplog):
    from dasheng_pipeline.training import step_checkpoint as sc

    steps = sc.StepCheckpoints(tmp_path)
    for step in (3, 5, 8):
        steps.save(
            step,
            {"w": torch.full((4,), float(step))},
            {"state": {}, "param_groups": []},
            [{**sc.rng_state(), "loss_sum": torch.tensor(float(step))}],
            {"epoch": 0, "batch": step},
        )
    assert sorted(p.name for p in steps.folder.iterdir()) == [
        "step-000000005",
        "step-000000008",
    ]  # the last two
    latest = steps.latest()
    assert latest.step == 8 and torch.equal(latest.model_state()["w"], torch.full((4,), 8.0))
    assert float(latest.rank_state(0)["loss_sum"]) == 8.0 and latest.manifest["batch"] == 8
    damaged = steps.folder / "step-000000008" / "optimizer.pt"
    data = bytearray(damaged.read_bytes())
    data[-3] ^= 0x01
    damaged.write_bytes(bytes(data))
    (
        steps.folder / "step-000000009"
    ).mkdir()  # half-written: no manifest (not renamed by our writer, say)
    with caplog.at_level("WARNING"):
        latest = steps.latest()
    assert latest.step == 5  # the one before
    assert f"{steps.folder / 'step-000000009'}: no readable manifest.json" in caplog.text
    assert f"{steps.folder / 'step-000000008'}: optimizer.pt has sha256" in caplog.text
    assert sorted(p.name for p in (steps.folder / ".damaged").iterdir()) == [
        "step-000000008",
        "step-000000009",
    ]
    state = sc.rng_state()
    expected = torch.rand(3)
    sc.set_rng_state(state)
    assert torch.equal(torch.rand(3), expected)


def test_one_driver_per_run_the_next_waits_for_a_lingering_one(tmp_path, caplog):
    """A second driver on the same state folder waits while another process holds the lock, names
    it, gives up after the wait; it gets the lock as soon as the holder dies (kill -9 included)."""
    from dasheng_pipeline.training import step_checkpoint as sc

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from dasheng_pipeline.training.step_checkpoint import driver_lock\n"
                "with driver_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)"
            ),
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "SLURM_JOB_ID": "41"},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with (
            caplog.at_level("WARNING"),
            pytest.raises(sc.RunBusy, match=rf"pid\W+{holder.pid}.*slurm_job\W+41"),
        ):
            with sc.driver_lock(tmp_path, wait_s=1.0):
                pass
        assert "waiting up to 1 s for it to exit" in caplog.text
        holder.kill()  # kill -9: the kernel drops the lock
        holder.wait()
        with sc.driver_lock(tmp_path, wait_s=5.0):
            assert json.loads((tmp_path / "driver.lock").read_text())["pid"] == os.getpid()
    finally:
        holder.kill()
        holder.wait()


def test_validation_batches_are_fixed_and_shared_between_ranks(tmp_path):
    parts = loader.parts_of(_tagged_shards(tmp_path))
    r0 = _rows(loader.ValidationBatches(parts, 4, 9, 0, 2))
    r1 = _rows(loader.ValidationBatches(parts, 4, 9, 1, 2))
    assert sorted(r0 + r1) == list(range(9)) and r0 == [0, 2, 4, 6, 8]


# ----------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory):
    work = tmp_path_factory.mktemp("train-data")
    snakemake(work, DATA_CONFIG, "data")
    return work


def train(work: Path, name: str, training=None, wait=True, **popen):
    params = {"training": {**TRAINING, **(training or {})}, "seed": 0}
    cmd = [
        sys.executable,
        "-m",
        "dasheng_pipeline.training.train",
        "--dataset",
        "results/demo/dataset/manifest.json",
        "--params",
        json.dumps(params),
        "--state-dir",
        f"state-{name}",
        "--out-dir",
        f"out-{name}",
    ]
    env = {**os.environ, "DASHENG_RAY_TMP": str(Path("/tmp") / f"ray-{os.getpid()}-{name}")}
    log = open(work / f"{name}.log", "ab")
    proc = subprocess.Popen(
        cmd,
        cwd=work,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
        **popen,
    )
    if wait:
        assert proc.wait(timeout=600) == 0, (work / f"{name}.log").read_text()[-4000:]
    return proc


def val_losses(metrics: Path) -> list[float]:
    with open(metrics, newline="") as fh:
        return [float(r["val_loss"]) for r in csv.DictReader(fh) if r["val_loss"]]


@pytest.fixture(scope="module")
def uninterrupted(demo_shards):
    train(demo_shards, "a")
    return demo_shards / "out-a"


@pytest.mark.slow
def test_two_cpu_workers_train_and_the_loss_falls(uninterrupted):
    with open(uninterrupted / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == list(range(12))
    train_losses = [float(r["train_loss"]) for r in rows]
    assert np.mean(train_losses[-4:]) < np.mean(train_losses[:4])
    vals = val_losses(uninterrupted / "metrics.csv")
    assert len(vals) == 3 and vals[-1] < vals[0]
    summary = read_json(uninterrupted / "summary.json")
    assert len(summary["averaged"]) == 2 and round(summary["averaged"][0]["val_loss"], 6) == min(
        vals
    )
    assert (uninterrupted / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(summary["provenance"]) == {"config_hash", "seed", "versions", "git_sha"}


@pytest.mark.slow
def test_exported_encoder_loads_in_the_hear_module(uninterrupted):
    from dasheng_model import hear

    model = hear.load_model(str(uninterrupted / "encoder.safetensors"))
    assert model.scene_embedding_size == 192 and model.sample_rate == 16000
    emb = hear.get_scene_embeddings(torch.randn(2, 16000) * 0.1, model)
    assert emb.shape == (2, 192) and torch.isfinite(emb).all()


def _first_checkpoint(state: Path, timeout=300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(state.glob("mae-*/checkpoint_*/state.json")):
            time.sleep(1.0)  # let Ray record it
            return
        time.sleep(0.2)
    raise AssertionError("no checkpoint appeared")


def _quick_set(path: Path) -> Path:
    """A two-class quick set (dasheng_pipeline.common.quick_checks's format): quiet vs loud low bins."""
    rng = np.random.default_rng(0)
    label = np.arange(24) % 2
    mel = rng.normal(-40, 5, (24, 64, 101))
    mel[label == 1, :16] += 20
    np.savez(
        path,
        name=np.array("toy"),
        mel=mel.astype(np.float16),
        valid_frames=np.full(24, 101),
        label=label,
        train=np.arange(24) < 16,
        classes=np.array(["quiet", "loud"]),
    )
    return path


@pytest.mark.slow
def test_a_lost_worker_is_restarted_from_the_last_checkpoint(demo_shards, uninterrupted):
    """... with quick checks every epoch in this run only: they leave the training unchanged
    (the same validation losses as the uninterrupted run without them), and the resumed run has one
    row per epoch and method."""
    checks = {
        "quick_checks": {"every_epochs": 1, "tasks": ["toy"], "k": 3, "layers": "last"},
        "quick_sets": [str(_quick_set(demo_shards / "quick.npz"))],
    }
    proc = train(demo_shards, "c", checks, wait=False)
    _first_checkpoint(demo_shards / "state-c")
    victims = [
        p
        for p in psutil.Process(proc.pid).children(recursive=True)
        if "RayTrainWorker" in " ".join(p.cmdline()) or p.name().startswith("ray::RayTrainWorker")
    ]
    assert victims, "no Ray Train worker process found"
    victims[-1].kill()
    assert proc.wait(timeout=600) == 0, (demo_shards / "c.log").read_text()[-4000:]
    assert val_losses(demo_shards / "out-c/metrics.csv") == val_losses(
        uninterrupted / "metrics.csv"
    )
    rows = list(csv.DictReader(open(demo_shards / "out-c/quick_checks.csv", newline="")))
    assert [(r["epoch"], r["step"], r["layer"], r["method"]) for r in rows] == [
        (str(e), str(4 * (e + 1)), "6", m) for e in range(3) for m in ("knn", "linear")
    ]
    assert all(0.0 <= float(r["score"]) <= 1.0 for r in rows)


def _wait_for(path_glob, folder: Path, timeout=300) -> None:
    deadline = time.time() + timeout
    while not any(folder.glob(path_glob)):
        assert time.time() < deadline, f"{path_glob} did not appear"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_signal_stops_training_with_a_step_checkpoint_and_the_next_run_resumes_exactly(
    demo_shards, uninterrupted
):
    """SIGTERM to the driver as soon as training starts: the workers finish their step, write a step
    checkpoint and stop; exit status 75. The next run resumes inside the epoch and ends with the
    uninterrupted run's metrics and weights, bit for bit."""
    from safetensors.torch import load_file

    from dasheng_pipeline.training import step_checkpoint as sc

    proc = train(demo_shards, "s", wait=False)
    _wait_for("mae-*/resume.json", demo_shards / "state-s")  # the workers have started
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=600) == sc.EXIT_RESUME, (demo_shards / "s.log").read_text()[-4000:]
    log = (demo_shards / "s.log").read_text()
    assert (
        "SIGTERM received: the workers finish their step, write a step checkpoint and stop" in log
    )
    # the step it stops after depends on how many steps ran before the signal (1 on a busy machine, 3 on
    # an idle one was seen); it is always inside an epoch (the last step of an epoch is followed by its
    # epoch checkpoint instead), and the next run must start exactly there
    stopped = re.search(r"not finished: stopped at step (\d+) of 12 \(SIGTERM\)", log)
    assert stopped, log[-4000:]
    stop_step = int(stopped.group(1))
    assert stop_step % TRAINING["batches_per_epoch"], stop_step
    assert not (demo_shards / "out-s/encoder.safetensors").exists()
    train(demo_shards, "s")
    [run_dir] = (demo_shards / "state-s").glob("mae-*")
    attempts = [json.loads(line) for line in (run_dir / "attempts.jsonl").read_text().splitlines()]
    assert [
        (a["outcome"], a["resumed_from"], a["start_step"], a["end_step"]) for a in attempts
    ] == [("stopped", "start", 0, stop_step), ("finished", "step checkpoint", stop_step, None)]
    assert (demo_shards / "out-s/metrics.csv").read_bytes() == (
        uninterrupted / "metrics.csv"
    ).read_bytes()
    a, b = (
        load_file(str(uninterrupted / "encoder.safetensors")),
        load_file(str(demo_shards / "out-s/encoder.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- bad input


def _dataset(work: Path) -> dict:
    return read_json(work / "results/demo/dataset/manifest.json")


def _copy_results(demo_shards: Path, tmp_path: Path) -> Path:
    """A private copy of the data: a failed check moves damaged shards aside."""
    import shutil

    shutil.copytree(
        demo_shards / "results", tmp_path / "results", ignore=shutil.ignore_patterns("audio")
    )
    return tmp_path


def test_bad_training_inputs_are_refused_before_training(demo_shards, tmp_path):
    from dasheng_pipeline.training.train import TrainingInputError, select_shards

    root = _copy_results(demo_shards, tmp_path)
    good = _dataset(root)
    with pytest.raises(TrainingInputError, match="lists no shards"):
        select_shards({**good, "shards": []}, ["demo_valid"], root, True)
    with pytest.raises(TrainingInputError, match="differ from the model's"):
        select_shards({**good, "mel": {**good["mel"], "n_mels": 128}}, ["demo_valid"], root, True)
    with pytest.raises(TrainingInputError, match="does not have"):
        select_shards(good, ["nope"], root, True)
    train, valid = select_shards(good, ["demo_valid"], root, True)
    assert len(train) == 2 and len(valid) == 1 and all(Path(p).is_absolute() for p in train + valid)
    bad = json.loads(json.dumps(good))
    bad["shards"][1]["sha256"] = "0" * 64
    with pytest.raises(shards.ShardError, match=bad["shards"][1]["path"].replace(".", r"\.")):
        select_shards(bad, ["demo_valid"], root, True)
    damaged = root / Path(bad["shards"][1]["path"]).parent
    assert (
        not damaged.exists() and (damaged.parent / ".damaged" / damaged.name).is_dir()
    )  # moved aside


def test_the_cli_names_a_damaged_shard_and_exits(demo_shards, tmp_path):
    work = _copy_results(demo_shards, tmp_path)
    manifest = _dataset(demo_shards)
    manifest["shards"][0]["sha256"] = "f" * 64
    atomic.write_json(work / "bad.json", manifest)
    params = {"training": TRAINING, "seed": 0}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dasheng_pipeline.training.train",
            "--dataset",
            "bad.json",
            "--params",
            json.dumps(params),
            "--state-dir",
            "st",
            "--out-dir",
            "out",
        ],
        cwd=work,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert (
        proc.stderr.startswith("error: ")
        and f"{manifest['shards'][0]['path']}: sha256" in proc.stderr
    )
    assert "does not match the manifest" in proc.stderr
    assert not (work / "st").exists() or not any((work / "st").rglob("checkpoint_*"))
