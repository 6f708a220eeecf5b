"""kill -9 at seeded random points of a fetch job (yt-dlp against the loopback server), a mel job
and training, one after the other in the same DAG, then a rerun: the DAG completes, every clip ends
in exactly one final status, the shards and manifests are byte-identical to an uninterrupted run's,
and the trained encoder has the same weights (CPU, fixed seed).

Each kill either takes the whole run down (Snakemake and every job: a crash; Snakemake then asks
for ``--unlock``, as a user would see) or only the job's process tree (the OOM killer: Snakemake
sees the job fail, deletes its outputs and stops)."""

from __future__ import annotations

import json
import random
import shutil

import fault_util as fu
import pytest
import torch
from safetensors.torch import load_file

from dasheng_pipeline.training.step_checkpoint import StepCheckpoints

pytestmark = [pytest.mark.slow, pytest.mark.network]


def _weights(work):
    return load_file(str(work / fu.OUT / "training/encoder.safetensors"))


@pytest.mark.parametrize("seed", [0, 1])
def test_kill_9_at_random_points_then_rerun(tmp_path, server, reference, seed, figures):
    ref_work = reference
    work = tmp_path / "w"
    work.mkdir()
    cfg = fu.dag_config(fu.segment_list(work), server.url_template)
    out = work / fu.OUT
    rng = random.Random(seed)
    plan = [  # stage, job marker, latest kill after the job is ready (s), ready condition
        (
            "fetch",
            "dasheng_pipeline.sources.youtube chunk",
            2.0,
            lambda: any((out / "audio/yt").rglob("*.flac")),
        ),
        (
            "mel",
            "dasheng_pipeline.features.mel",
            1.0,
            lambda: any(p.is_file() for p in (out / "shards").glob("*/*/*")),
        ),
        (
            "train",
            "dasheng_pipeline.training.train",
            4.0,
            lambda: any((out / "training_state").rglob("checkpoint_*/state.json")),
        ),
    ]
    kills, broken_after_kill = [], []
    try:
        for i, (stage, marker, max_delay, ready) in enumerate(plan):
            mode = ("all", "job")[(seed + i) % 2]
            proc = fu.start(work, cfg, "all", log_name=f"run{i}.log")
            hit = fu.kill_at_random_point(proc, marker, rng, max_delay, mode=mode, ready=ready)
            fu.sweep(fu.ray_tmp(work))
            kills.append({"stage": stage, **hit})
            broken_after_kill += fu.untrusted_finals(out)
            if mode == "all":
                fu.run(work, cfg, "--unlock")
        final = fu.run(work, cfg, "all")
        nothing_left = fu.run(work, cfg, "-n", "all")
    finally:
        fu.sweep(fu.ray_tmp(work))
        fu.sweep(str(work))

    ref_account, got_account = fu.accounting(ref_work), fu.accounting(work)
    lost = fu.clips_lost(ref_account, got_account)
    ref_digests, got_digests = fu.digests(ref_work / fu.OUT), fu.digests(out)
    a, b = _weights(ref_work), _weights(work)
    same_weights = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    same_metrics = (out / "training/metrics.csv").read_bytes() == (
        ref_work / fu.OUT / "training/metrics.csv"
    ).read_bytes()
    verified = fu.verify_dataset(work)
    leftovers = [p for p in fu.temp_leftovers(out) if "training_state" not in p]
    survived = (
        lost == 0
        and got_digests == ref_digests
        and same_weights
        and same_metrics
        and not leftovers
        and not broken_after_kill
        and "Nothing to be done" in nothing_left.stdout + nothing_left.stderr
    )
    for k in kills:
        figures.record(
            "kill -9",
            f"{k['stage']} job (seed {seed})",
            tried=1,
            survived=int(survived),
            lost=lost,
            mode=k["mode"],
            delay_s=k["delay_s"],
        )

    assert final.returncode == 0
    assert [k["stage"] for k in kills] == ["fetch", "mel", "train"]
    assert broken_after_kill == [], "a file under a final name was not whole right after a kill"
    assert lost == 0 and len(got_account) == len(ref_account) == sum(fu.DAG_CLIPS.values())
    statuses = [s for _, s, _ in got_account.values()]
    assert {k: statuses.count(k) for k in fu.DAG_CLIPS} == fu.DAG_CLIPS
    assert got_digests == ref_digests and len(got_digests) > 10
    assert verified == len([p for p in got_digests if p.endswith(".parquet")])
    assert same_weights and same_metrics
    assert leftovers == []
    assert "Nothing to be done" in nothing_left.stdout + nothing_left.stderr


def test_kill_9_inside_an_epoch_resumes_from_the_step_checkpoint(
    tmp_path, server, reference, figures
):
    """Training with step checkpoints (after about every step here) is killed -9 inside an epoch;
    the newest step checkpoint is then damaged (one bit). The rerun names the damaged checkpoint,
    moves it aside, resumes from the one before it and ends with the uninterrupted run's weights and
    metrics. The data stage's outputs are copied from the reference run, so only training runs."""
    shutil.copytree(
        reference,
        tmp_path / "w",
        ignore=shutil.ignore_patterns("training", "training_state", "*.log"),
    )
    work = tmp_path / "w"
    cfg = fu.dag_config(reference / "segments.csv", server.url_template)
    cfg["training"] = {**cfg["training"], "checkpoint_every_min": 0.002}  # every step (0.12 s)
    state = work / fu.OUT / "training_state"
    bpe = cfg["training"]["batches_per_epoch"]
    rng = random.Random(0)

    def committed_steps(
        run_dirs,
    ):  # (step, folder), oldest first: what the training itself would consider
        return sorted(
            (int(p.name.removeprefix("step-")), p)
            for d in run_dirs
            for p in StepCheckpoints(d).folders()
        )

    def mid_epoch_checkpoint():  # a step checkpoint inside the second epoch exists
        return any(step % bpe and step > bpe for step, _ in committed_steps(state.glob("mae-*")))

    try:
        proc = fu.start(work, cfg, "all", log_name="run0.log")
        hit = fu.kill_at_random_point(
            proc,
            "dasheng_pipeline.training.train",
            rng,
            0.3,
            mode="all",
            ready=mid_epoch_checkpoint,
        )
        fu.sweep(fu.ray_tmp(work))
        [run_dir] = state.glob("mae-*")
        killed_at = json.loads((run_dir / "progress.json").read_text())["step"]
        # (a kill while a checkpoint is written leaves a step-<N>.tmp-* folder: never a resume point)
        kept = committed_steps([run_dir])
        newest, previous_step = kept[-1][1], kept[-2][0]
        epoch_step = max(
            json.loads(p.read_text())["step"] for p in run_dir.glob("checkpoint_*/state.json")
        )
        data = bytearray((newest / "model.safetensors").read_bytes())
        data[len(data) // 2] ^= 0x01
        (newest / "model.safetensors").write_bytes(bytes(data))
        fu.run(work, cfg, "--unlock")
        final = fu.run(work, cfg, "all")
    finally:
        fu.sweep(fu.ray_tmp(work))
        fu.sweep(str(work))
    train_log = (work / fu.OUT / "logs/training/train.log").read_text()
    resumed = json.loads((run_dir / "resume.json").read_text())
    a, b = _weights(reference), _weights(work)
    same_weights = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    same_metrics = (work / fu.OUT / "training/metrics.csv").read_bytes() == (
        reference / fu.OUT / "training/metrics.csv"
    ).read_bytes()
    named = f"step checkpoint skipped: {newest}: model.safetensors has sha256" in train_log
    survived = same_weights and same_metrics and named and final.returncode == 0
    figures.record(
        "kill -9",
        "training inside an epoch (step checkpoints)",
        tried=1,
        survived=int(survived),
        delay_s=hit["delay_s"],
        killed_at_step=killed_at,
        resumed_at_step=resumed["step"],
        resumed_from=resumed["from"],
    )
    figures.record(
        "damaged step checkpoint",
        "one bit flipped in the newest",
        tried=1,
        survived=int(survived and named and (run_dir / "steps/.damaged" / newest.name).is_dir()),
        skipped=newest.name,
        used=resumed["step"],
    )

    assert final.returncode == 0
    assert named, train_log[-3000:]
    assert (run_dir / "steps/.damaged" / newest.name).is_dir()  # moved aside, never loaded
    # the one before the damaged one, or the epoch checkpoint if that is newer: never an older point
    assert (resumed["from"], resumed["step"]) == max(
        (("step checkpoint", previous_step), ("epoch checkpoint", epoch_step)), key=lambda x: x[1]
    )
    assert same_weights and same_metrics
