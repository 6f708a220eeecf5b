"""Dasheng MAE pre-training with Ray Train (``TorchTrainer``, DDP), from the log-mel shards.

``python -m dasheng_pipeline.training.train`` is the training rule's entry point. The driver:

1. checks its inputs before anything starts — a non-empty shard list, mel parameters equal to
   the model's front end, every shard's sha256 against the dataset manifest — and names the
   shard at fault;
2. starts Ray (a local instance with N CPU workers, or joins ``--address`` on a cluster) and runs
   one training worker per GPU/CPU slot. Each worker: bf16 autocast on GPU, fp32 on CPU unless
   ``precision: bf16`` (autocast on CPU too; front end and loss in fp32);
   bitsandbytes ``AdamW8bit`` (or ``torch.optim.AdamW``); the paper's schedule per step;
   an epoch is ``batches_per_epoch`` global batches; validation MSE on held-out sources and a
   checkpoint (weights, optimiser, state) every epoch;
3. keeps its state (Ray's ``storage_path``: checkpoints, metrics, TensorBoard) in
   ``--state-dir``, outside the rule's outputs, under a run name made from the config hash:
   a rerun after a crash or ``kill -9`` resumes from the last checkpoint — an epoch's, or a step
   checkpoint inside an epoch (``step_checkpoint.py``: every ``checkpoint_every_min`` minutes and
   when a signal asks the job to stop, after which it exits with status 75, "resume me") — and, on
   CPU with a fixed seed, reproduces the uninterrupted run exactly; a lost worker is restarted
   (``FailureConfig``);
4. averages the encoder weights of the best ``average_best`` checkpoints by validation loss and
   exports them (safetensors + JSON) with the metrics CSV, a loss-curve PNG and a summary.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from dasheng_model.checkpoint import save_checkpoint
from dasheng_model.encoder import DashengEncoder, encoder_config
from dasheng_model.frontend import MEL_PARAMS
from dasheng_model.mae import DEFAULT_DECODER, MaskedAutoencoder
from dasheng_pipeline.common import atomic, logs, provenance, quick_checks
from dasheng_pipeline.features import shards
from dasheng_pipeline.training import loader, schedule, step_checkpoint
from dasheng_pipeline.training.averaging import average_state_dicts, encoder_state

log = logging.getLogger(
    "dasheng_pipeline.training.train"
)  # (not __name__: "__main__" as the entry point)

METRIC_FIELDS = ["epoch", "step", "lr", "train_loss", "val_loss"]
THROUGHPUT_FIELDS = ["epoch", "seconds", "samples_per_s", "tokens_per_s", "loader_wait_fraction"]
TOKENS_PER_WINDOW = 250


class TrainingInputError(ValueError):
    """The training inputs are unusable; the message names the file and what to do."""


class StoppedEarly(Exception):
    """The workers stopped at a step checkpoint on request (a signal): the next job resumes."""


# --------------------------------------------------------------------------- inputs


def select_shards(
    dataset: dict, validation_sources: list[str], root: Path, verify: bool
) -> tuple[list[str], list[str]]:
    """(train shard paths, validation shard paths), absolute, after all checks."""
    if dataset.get("mel") is None or not dataset["shards"]:
        raise TrainingInputError(
            "the dataset manifest lists no shards: the data stage produced nothing to train on"
        )
    expected = {k: float(v) for k, v in MEL_PARAMS.items()}
    got = {k: float(dataset["mel"].get(k, "nan")) for k in MEL_PARAMS}
    if got != expected:
        diff = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
        raise TrainingInputError(
            f"shards were computed with mel parameters that differ from the model's "
            f"front end (got, expected): {diff}; rebuild the shards with the model's parameters"
        )
    if verify:
        shards.verify_all(dataset["shards"], root)
    train, valid = [], []
    for entry in dataset["shards"]:
        path = (root / entry["path"]).resolve()
        meta = shards.read_meta(path)
        if {k: float(meta["mel"].get(k, "nan")) for k in MEL_PARAMS} != expected:
            raise TrainingInputError(
                f"{entry['path']}: its mel parameters {meta['mel']} differ from the model's {MEL_PARAMS}"
            )
        if entry["rows"] == 0:
            continue
        (valid if entry["source"] in validation_sources else train).append(str(path))
    unknown = set(validation_sources) - {e["source"] for e in dataset["shards"]}
    if unknown:
        raise TrainingInputError(
            f"training.validation_sources names {sorted(unknown)}, which the dataset does not have"
        )
    if not train:
        raise TrainingInputError(
            "no training shards with rows (all shards are empty or held out for validation)"
        )
    if not valid:
        raise TrainingInputError(
            "no validation shards: set training.validation_sources to a source with audio"
        )
    return train, valid


# Keys that only say how the run is scheduled: changing them between jobs keeps the run (and resumes it).
SCHEDULING_KEYS = (
    "runtime_min",
    "total_runtime_min",
    "checkpoint_every_min",
    "signal_lead_s",
    "mem_mb",
)


def run_name(cfg: dict) -> str:
    return "mae-" + provenance.config_hash(
        {k: v for k, v in cfg.items() if k not in SCHEDULING_KEYS}
    )


# --------------------------------------------------------------------------- worker


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63 - 1)


def make_optimizer(params, cfg: dict) -> torch.optim.Optimizer:
    if cfg["optimizer"] == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(
            params, lr=cfg["lr"], weight_decay=cfg["weight_decay"], betas=(0.9, 0.95)
        )
    # fused: one kernel for all tensors, about 2.5x the default per-tensor loop on CPU (BENCHMARKS.md)
    return torch.optim.AdamW(
        params, lr=cfg["lr"], weight_decay=cfg["weight_decay"], betas=(0.9, 0.95), fused=True
    )


def _truncate_csv(path: Path, fields: list[str], keep_below_epoch: int) -> None:
    """Drop rows of epochs that a resumed run will redo (they came from an interrupted epoch)."""
    rows = []
    if path.exists():
        with open(path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if int(r["epoch"]) < keep_below_epoch]
    with atomic.atomic_open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _append_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    with open(path, "a", newline="") as fh:
        csv.DictWriter(fh, fieldnames=fields).writerows(rows)
        fh.flush()
        os.fsync(fh.fileno())


def _mean_across_ranks(total: float, count: int, device) -> float:
    import torch.distributed as dist

    t = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return float(t[0] / t[1].clamp(min=1))


@torch.no_grad()
def validate(model, batches, device, seed: int, bf16: bool) -> float:
    model.eval()
    total, count = 0.0, 0
    for i, batch in enumerate(batches):
        gen = torch.Generator(device=device).manual_seed(
            _step_seed(seed, -1 - i, 0)
        )  # same masks every epoch
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(batch["mel"].to(device), batch["valid_frames"].to(device), generator=gen)
        n = batch["mel"].shape[0]
        total += float(out.loss) * n
        count += n
    model.train()
    return _mean_across_ranks(total, count, device)


def start_normalisation_at_data_stats(mae: MaskedAutoencoder, stats: dict) -> None:
    """Start init_bn's running mean/variance at the dataset's per-mel-bin statistics (from the
    dataset manifest) instead of 0/1. With momentum 0.01 the running statistics need several
    hundred steps to reach the data's (dB values around -35 ± 23): a short run would otherwise
    export an encoder whose eval-mode normalisation is still far off."""
    bn = mae.encoder.init_bn[1]
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor(stats["mean"], dtype=bn.running_mean.dtype))
        bn.running_var.copy_(
            torch.tensor(stats["std"], dtype=bn.running_var.dtype).clamp(min=1e-3) ** 2
        )


def train_worker(cfg: dict) -> None:  # noqa: C901 (to split: issue 24)
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    from safetensors.torch import load_file, save_file

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg["threads_per_worker"])))
    device = ray.train.torch.get_device()
    # bf16 autocast: asked for (CPU or GPU), or "auto" on a GPU; the front end and the loss stay fp32
    bf16 = cfg["precision"] == "bf16" or (cfg["precision"] == "auto" and device.type == "cuda")
    state_dir = Path(cfg["state_dir"])
    per_rank = cfg["global_batch"] // world
    bpe, epochs = cfg["batches_per_epoch"], cfg["epochs"]
    total_steps = bpe * epochs
    warmup_steps = int(round(cfg["warmup_epochs"] * bpe))

    torch.manual_seed(cfg["seed"])
    mae = MaskedAutoencoder(cfg["size"], cfg["decoder"], cfg["mask_ratio"])
    start_normalisation_at_data_stats(mae, cfg["mel_stats"])
    optimizer = make_optimizer(mae.parameters(), cfg)
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            mae.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
            optimizer.load_state_dict(
                torch.load(
                    os.path.join(folder, "optimizer.pt"), map_location="cpu", weights_only=True
                )
            )
            start_epoch = json.loads(Path(folder, "state.json").read_text())["epoch"] + 1
    resumed = _resume_from_step_checkpoint(mae, optimizer, start_epoch * bpe, cfg, rank, world)
    start_epoch, skip = (resumed["epoch"], resumed["batch"]) if resumed else (start_epoch, 0)
    model = ray.train.torch.prepare_model(mae)
    if cfg["compile"]:
        model = torch.compile(model)

    metrics_csv, throughput_csv = state_dir / "metrics.csv", state_dir / "throughput.csv"
    writer = None
    if rank == 0:
        _truncate_csv(metrics_csv, METRIC_FIELDS, start_epoch)
        _truncate_csv(throughput_csv, THROUGHPUT_FIELDS, start_epoch)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(state_dir / "tensorboard"), purge_step=start_epoch * bpe + skip)
        check = quick_checks.QuickChecks(
            cfg, state_dir, start_epoch
        )  # k-NN + linear probe every N epochs
    steps = step_checkpoint.StepCheckpoints(state_dir)
    timer = step_checkpoint.Schedule(
        step_checkpoint.Control(state_dir), cfg["checkpoint_every_min"], rank, device
    )

    train_parts, valid_parts = (
        loader.parts_of(cfg["train_shards"]),
        loader.parts_of(cfg["valid_shards"]),
    )
    for epoch in range(start_epoch, epochs):
        data = torch.utils.data.DataLoader(
            loader.TrainBatches(
                train_parts,
                per_rank,
                bpe,
                cfg["seed"],
                epoch,
                rank,
                world,
                cfg["shuffle_buffer"],
                skip=skip,
            ),
            batch_size=None,
            num_workers=cfg["loader_workers"],
            pin_memory=device.type == "cuda",
        )
        rows, loss_sum, wait = [], 0.0, 0.0
        if (
            resumed and epoch == resumed["epoch"]
        ):  # the part of this epoch done before the step checkpoint
            rows, loss_sum = resumed["rows"], resumed["loss_sum"].to(device)
        started = last_progress = time.perf_counter()
        fetch_start = time.perf_counter()
        for i, batch in enumerate(data, start=skip):
            wait += time.perf_counter() - fetch_start
            step = epoch * bpe + i
            lr = schedule.learning_rate(
                step, cfg["lr"], warmup_steps, total_steps, cfg["final_lr_fraction"]
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            gen = torch.Generator(device=device).manual_seed(_step_seed(cfg["seed"], step, rank))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(
                    batch["mel"].to(device, non_blocking=True),
                    batch["valid_frames"].to(device, non_blocking=True),
                    generator=gen,
                )
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum = loss_sum + out.loss.detach()  # stays on the device: no sync per step
            if rank == 0 and (i % cfg["log_every"] == 0 or i == bpe - 1):
                loss = out.loss.detach().item()  # rank 0's own batch loss at this step
                rows.append(
                    {
                        "epoch": epoch,
                        "step": step,
                        "lr": f"{lr:.8g}",
                        "train_loss": f"{loss:.6f}",
                        "val_loss": "",
                    }
                )
                writer.add_scalar("train/loss", loss, step)
                writer.add_scalar("train/lr", lr, step)
                now = time.perf_counter()
                if now - last_progress > 1.0 or i == bpe - 1:
                    atomic.write_json(
                        state_dir / "progress.json",
                        {
                            "step": step + 1,
                            "total": total_steps,
                            "epoch": epoch,
                            "loss": round(loss, 4),
                        },
                    )
                    last_progress = now
            if i < bpe - 1:  # (the epoch's last step is followed by its epoch checkpoint)
                save, stop = timer.poll()
                if save:
                    _save_step_checkpoint(
                        steps,
                        model,
                        optimizer,
                        step + 1,
                        epoch,
                        i + 1,
                        rows,
                        loss_sum,
                        cfg,
                        rank,
                        world,
                        "stop" if stop else "schedule",
                    )
                    timer.saved()
                if stop:
                    if rank == 0:
                        timer.control.mark_stopped({"step": step + 1, "total": total_steps})
                        writer.close()
                    return
            fetch_start = time.perf_counter()
        seconds = time.perf_counter() - started
        batches_run, skip = bpe - skip, 0
        val_loss = validate(
            model,
            loader.ValidationBatches(valid_parts, per_rank, cfg["validation_rows"], rank, world),
            device,
            cfg["seed"],
            bf16,
        )
        train_loss = _mean_across_ranks(float(loss_sum), bpe, device)
        metrics = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss}
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            timer.saved()
            continue
        rows[-1]["val_loss"] = f"{val_loss:.6f}"
        check.after_epoch(model, epoch, (epoch + 1) * bpe, writer)
        _append_csv(metrics_csv, METRIC_FIELDS, rows)
        samples = batches_run * cfg["global_batch"]
        timer.saved()  # an epoch checkpoint is a resume point too
        _append_csv(
            throughput_csv,
            THROUGHPUT_FIELDS,
            [
                {
                    "epoch": epoch,
                    "seconds": f"{seconds:.3f}",
                    "samples_per_s": f"{samples / seconds:.2f}",
                    "tokens_per_s": f"{samples * TOKENS_PER_WINDOW / seconds:.1f}",
                    "loader_wait_fraction": f"{wait / seconds:.4f}",
                }
            ],
        )
        writer.add_scalar("val/loss", val_loss, (epoch + 1) * bpe)
        writer.add_scalar("throughput/samples_per_s", samples / seconds, epoch)
        writer.flush()
        with tempfile.TemporaryDirectory(dir=state_dir) as folder:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in _unwrap(model).state_dict().items()},
                os.path.join(folder, "model.safetensors"),
            )
            torch.save(optimizer.state_dict(), os.path.join(folder, "optimizer.pt"))
            Path(folder, "state.json").write_text(
                json.dumps({**metrics, "step": (epoch + 1) * bpe}, sort_keys=True)
            )
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
    if writer is not None:
        writer.close()


def _unwrap(model):
    model = model.module if hasattr(model, "module") else model
    return getattr(model, "_orig_mod", model)


def _save_step_checkpoint(
    steps,
    model,
    optimizer,
    step: int,
    epoch: int,
    batch: int,
    rows: list[dict],
    loss_sum,
    cfg: dict,
    rank: int,
    world: int,
    reason: str,
) -> None:
    """Every rank: gather the ranks' RNG states and loss sums; rank 0 writes the checkpoint."""
    mine = {
        **step_checkpoint.rng_state(),
        "loss_sum": torch.as_tensor(loss_sum).detach().cpu().reshape(()),
    }
    ranks = step_checkpoint.gather(mine, world)
    if rank == 0:
        info = {
            "epoch": epoch,
            "batch": batch,
            "world_size": world,
            "loader_workers": cfg["loader_workers"],
            "batches_per_epoch": cfg["batches_per_epoch"],
            "rows": rows,
            "reason": reason,
        }
        path = steps.save(step, _unwrap(model).state_dict(), optimizer.state_dict(), ranks, info)
        log.info(f"step checkpoint {path} (step {step}, epoch {epoch}, batch {batch}; {reason})")


def _resume_from_step_checkpoint(
    mae, optimizer, epoch_step: int, cfg: dict, rank: int, world: int
) -> dict | None:
    """Load the newest intact step checkpoint when it is newer than the epoch checkpoint (at global
    step ``epoch_step``); rank 0 chooses (and checks the sha256s), every rank loads the same one.
    Returns {"epoch", "batch", "rows", "loss_sum"} or None."""
    state_dir = Path(cfg["state_dir"])
    chosen = None
    if rank == 0:
        latest = step_checkpoint.StepCheckpoints(state_dir).latest()
        chosen = str(latest.path) if latest and latest.step > epoch_step else None
        atomic.write_json(
            state_dir / "resume.json",
            {
                "step": latest.step if chosen else epoch_step,
                "from": "step checkpoint"
                if chosen
                else "epoch checkpoint"
                if epoch_step
                else "start",
                "path": chosen,
            },
        )
    chosen = step_checkpoint.broadcast(chosen, rank)
    if chosen is None:
        return None
    ckpt = step_checkpoint.StepCheckpoint(
        Path(chosen), json.loads(Path(chosen, step_checkpoint.MANIFEST).read_text())
    )
    info = ckpt.manifest
    if info["world_size"] != world or info["loader_workers"] != cfg["loader_workers"]:
        raise RuntimeError(
            f"{chosen}: written by {info['world_size']} workers x {info['loader_workers']} loader "
            f"workers, this run has {world} x {cfg['loader_workers']}"
        )
    mae.load_state_dict(ckpt.model_state())
    optimizer.load_state_dict(ckpt.optimizer_state())
    mine = ckpt.rank_state(rank)
    step_checkpoint.set_rng_state(mine)
    if rank == 0:
        log.info(
            f"resuming from step checkpoint {chosen}: step {ckpt.step}, epoch {info['epoch']}, batch {info['batch']}"
        )
    return {
        "epoch": info["epoch"],
        "batch": info["batch"],
        "rows": info["rows"],
        "loss_sum": mine["loss_sum"],
    }


# --------------------------------------------------------------------------- driver


class _Progress(threading.Thread):
    """Shows the workers' progress (rank 0 writes progress.json) as a bar on the driver."""

    def __init__(self, path: Path, total: int):
        super().__init__(daemon=True)
        self.path, self.total, self.stop = path, total, threading.Event()

    def run(self) -> None:
        from tqdm import tqdm

        bar = tqdm(
            total=self.total, desc="MAE training", unit="step", file=sys.stdout, mininterval=2
        )
        while not self.stop.wait(1.0):
            try:
                info = json.loads(self.path.read_text())
            except (OSError, ValueError):
                continue
            bar.n = min(info["step"], self.total)
            bar.set_postfix(epoch=info["epoch"], loss=info["loss"], refresh=False)
            bar.refresh()
        bar.close()


def _start_ray(address: str | None, cfg: dict, state_dir: Path) -> None:
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # reports are once per epoch
    # Ray's own INFO/WARNING chatter (per-report lines, the state-API polling of a cluster without
    # dashboard) would drown the log; errors still reach it, and the progress bar shows the rest.
    quiet = ray.LoggingConfig(encoding="TEXT", log_level="ERROR")
    if address:
        ray.init(address=address, logging_config=quiet)
        return
    cpus = cfg["workers"] * cfg["cpus_per_worker"]
    ray.init(
        num_cpus=cpus,
        num_gpus=cfg["workers"] if cfg["use_gpu"] else 0,
        include_dashboard=False,
        object_store_memory=cfg["object_store_mb"] << 20,
        logging_config=quiet,
        _temp_dir=os.environ.get("DASHENG_RAY_TMP") or tempfile.mkdtemp(prefix="ray-", dir="/tmp"),
    )


def export(best: list[tuple[Path, float, int]], cfg: dict, stamp: dict, out_dir: Path) -> Path:
    """Average the encoders of the best checkpoints (folder, val loss, epoch) and save the result."""
    states = [encoder_state(folder / "model.safetensors") for folder, _, _ in best]
    encoder = DashengEncoder(encoder_config(cfg["size"]))
    encoder.load_state_dict(average_state_dicts(states))
    return save_checkpoint(encoder, out_dir / "encoder.safetensors", provenance=stamp)


def run(
    params: dict, dataset_path: str, state_dir: str, out_dir: str, address: str | None = None
) -> dict:
    cfg = dict(params["training"])
    cfg["seed"] = int(params["seed"])
    cfg["decoder"] = cfg["decoder"] or DEFAULT_DECODER[cfg["size"]]
    if cfg["global_batch"] % cfg["workers"]:
        raise TrainingInputError(
            f"training.global_batch={cfg['global_batch']} is not divisible by "
            f"training.workers={cfg['workers']}"
        )
    dataset = shards.load_dataset_manifest(dataset_path)
    train, valid = select_shards(
        dataset, cfg["validation_sources"], Path.cwd(), cfg["verify_shards"]
    )
    # the run's name hashes the shards as the manifest names them (relative to the working folder), not
    # their absolute paths: the same run resumes after the project folder moved, and two checkouts of one
    # config (a local run and a cluster run, say) name it alike
    shard_names = {
        "train": [os.path.relpath(p) for p in train],
        "valid": [os.path.relpath(p) for p in valid],
    }
    name = run_name({k: cfg[k] for k in sorted(cfg)} | shard_names)
    state = Path(state_dir).resolve() / name
    state.mkdir(parents=True, exist_ok=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    worker_cfg = {
        **cfg,
        "train_shards": train,
        "valid_shards": valid,
        "state_dir": str(state),
        "quick_sets": [str(Path(p).resolve()) for p in cfg["quick_sets"]],
        "threads_per_worker": cfg["cpus_per_worker"],
        "mel_stats": dataset["stats"],
    }
    log.info(
        f"training {cfg['size']} MAE: {len(train)} train / {len(valid)} validation shards, "
        f"{cfg['epochs']} epochs x {cfg['batches_per_epoch']} batches of {cfg['global_batch']}, "
        f"{cfg['workers']} workers ({'GPU' if cfg['use_gpu'] else 'CPU'}), state in {state}"
    )

    control = step_checkpoint.Control(state)
    with step_checkpoint.driver_lock(state):
        control.clear()
        with step_checkpoint.signal_handlers(control):
            return _train(cfg, params, worker_cfg, name, state, out, control, address)


def _train(cfg, params, worker_cfg, name, state, out, control, address) -> dict:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    _start_ray(address, cfg, state)
    step_checkpoint.install_handlers(control)  # again: ray.init sets its own SIGTERM handler
    progress = _Progress(state / "progress.json", cfg["epochs"] * cfg["batches_per_epoch"])
    progress.start()
    try:
        trainer = TorchTrainer(
            train_worker,
            train_loop_config=worker_cfg,
            scaling_config=ScalingConfig(
                num_workers=cfg["workers"],
                use_gpu=cfg["use_gpu"],
                resources_per_worker={
                    "CPU": cfg["cpus_per_worker"],
                    **({"GPU": 1} if cfg["use_gpu"] else {}),
                },
            ),
            run_config=RunConfig(
                name=name,
                storage_path=str(state.parent),
                checkpoint_config=CheckpointConfig(
                    num_to_keep=max(cfg["keep_best"], cfg["average_best"]),
                    checkpoint_score_attribute="val_loss",
                    checkpoint_score_order="min",
                ),
                failure_config=FailureConfig(max_failures=cfg["max_failures"]),
            ),
        )
        result = trainer.fit()
    finally:
        progress.stop.set()
        progress.join(timeout=5)
        ray.shutdown()
    _record_job(state, control, result)
    if result.error:
        raise result.error
    stopped = control.stopped()
    if stopped:
        raise StoppedEarly(
            f"stopped at step {stopped['step']} of {stopped['total']} ({control.stop_reason()}); "
            f"the step checkpoint is in {state / 'steps'}: run again to resume "
            f"(exit status {step_checkpoint.EXIT_RESUME})"
        )
    best = sorted(
        ((Path(c.path), float(m["val_loss"]), int(m["epoch"])) for c, m in result.best_checkpoints),
        key=lambda item: (item[1], item[2]),
    )[: cfg["average_best"]]
    stamp = provenance.stamp(params, cfg["seed"])
    path = export(best, cfg, stamp, out)
    shutil.copyfile(state / "metrics.csv", out / "metrics.csv")
    shutil.copyfile(state / "throughput.csv", out / "throughput.csv")
    shutil.copyfile(state / quick_checks.CSV_NAME, out / quick_checks.CSV_NAME)
    summary = {
        "encoder": str(path),
        "size": cfg["size"],
        "decoder": cfg["decoder"],
        "run": name,
        "averaged": [{"epoch": e, "val_loss": v} for _, v, e in best],
        "epochs": cfg["epochs"],
        "final_val_loss": _last_val_loss(out / "metrics.csv"),
        "provenance": stamp,
    }
    atomic.write_json(out / "summary.json", summary)
    from dasheng_pipeline.training.curve import loss_curve  # matplotlib: only the driver needs it

    loss_curve(out / "metrics.csv", out / "loss_curve.png", stamp)
    log.info(
        f"exported {path} (mean of {len(best)} best checkpoints, val loss "
        f"{', '.join(f'{v:.4f}' for _, v, _ in best)})"
    )
    return summary


def _record_job(state: Path, control: step_checkpoint.Control, result) -> None:
    try:
        resumed = json.loads((state / "resume.json").read_text())
    except (OSError, ValueError):
        resumed = {}
    stopped = control.stopped()
    outcome = "error" if result.error else "stopped" if stopped else "finished"
    step_checkpoint.record_attempt(
        state,
        {
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "outcome": outcome,
            "resumed_from": resumed.get("from"),
            "start_step": resumed.get("step"),
            "end_step": stopped["step"] if stopped else None,
            "signal": control.stop_reason() if stopped else None,
        },
    )


def _last_val_loss(metrics_csv: Path) -> float | None:
    with open(metrics_csv, newline="") as fh:
        vals = [float(r["val_loss"]) for r in csv.DictReader(fh) if r["val_loss"]]
    return vals[-1] if vals else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dasheng_pipeline.training.train", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--dataset", required=True, help="dataset manifest (JSON) from the data stage"
    )
    parser.add_argument("--params", required=True, help="JSON: training section and seed")
    parser.add_argument(
        "--state-dir", required=True, help="Ray storage: checkpoints survive reruns here"
    )
    parser.add_argument("--out-dir", required=True, help="exported encoder, metrics, plot, summary")
    parser.add_argument(
        "--address", default=None, help="join a running Ray cluster (e.g. head:6379)"
    )
    args = parser.parse_args(argv)
    logs.setup()
    try:
        run(json.loads(args.params), args.dataset, args.state_dir, args.out_dir, args.address)
    except (TrainingInputError, shards.ShardError, step_checkpoint.RunBusy) as exc:
        raise SystemExit(f"error: {exc}") from None
    except StoppedEarly as exc:
        log.warning(f"not finished: {exc}")
        raise SystemExit(step_checkpoint.EXIT_RESUME) from None


if __name__ == "__main__":
    main()
