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
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    "nodes",
    "hang_timeout_s",
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


@dataclass
class _Worker:
    """One Ray Train worker's run: its place in the group, what it trains and where it resumes."""

    cfg: dict
    rank: int
    world: int
    device: torch.device
    bf16: bool  # autocast: asked for (CPU or GPU), or "auto" on a GPU; front end and loss stay fp32
    state_dir: Path
    model: Any = None  # the MAE as trained (wrapped for DDP, maybe compiled)
    optimizer: Any = None
    start_epoch: int = 0
    skip: int = 0  # batches of start_epoch done before a step checkpoint
    resumed: dict | None = None  # what that step checkpoint holds (rows, loss sum)
    writer: Any = None  # rank 0: TensorBoard
    check: Any = None  # rank 0: the quick checks
    steps: Any = None  # the step checkpoints
    timer: Any = None  # when to write a step checkpoint, when to stop

    @property
    def bpe(self) -> int:
        return int(self.cfg["batches_per_epoch"])

    @property
    def total_steps(self) -> int:
        return self.bpe * int(self.cfg["epochs"])


@dataclass
class _Epoch:
    """What one epoch's steps add up to."""

    rows: list[dict] = field(default_factory=list)  # rank 0's metric rows
    loss_sum: Any = 0.0  # the sum of this rank's batch losses (a tensor on the device)
    wait: float = 0.0  # seconds spent waiting for the loader
    seconds: float = 0.0
    batches: int = 0  # batches run in this job
    last_progress: float = 0.0


def train_worker(cfg: dict) -> None:
    """Runs on every Ray Train worker: build or restore the model, then train epoch by epoch."""
    w = _start_worker(cfg)
    _restore(w)
    _log_placement(w)
    _open_logs(w)
    train_parts, valid_parts = (
        loader.parts_of(cfg["train_shards"]),
        loader.parts_of(cfg["valid_shards"]),
    )
    for epoch in range(w.start_epoch, cfg["epochs"]):
        tally = _train_epoch(w, epoch, train_parts)
        if tally is None:  # stopped on request, after a step checkpoint
            return
        _end_epoch(w, epoch, tally, valid_parts)
    if w.writer is not None:
        w.writer.close()


def _start_worker(cfg: dict) -> _Worker:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    torch.set_num_threads(max(1, int(cfg["threads_per_worker"])))
    device = ray.train.torch.get_device()
    return _Worker(
        cfg=cfg,
        rank=ctx.get_world_rank(),
        world=ctx.get_world_size(),
        device=device,
        bf16=cfg["precision"] == "bf16" or (cfg["precision"] == "auto" and device.type == "cuda"),
        state_dir=Path(cfg["state_dir"]),
    )


def _restore(w: _Worker) -> None:
    """The model and optimiser, from the newest epoch checkpoint (Ray's) or, when newer, step
    checkpoint; then wrapped for DDP."""
    import ray.train
    import ray.train.torch
    from safetensors.torch import load_file

    cfg = w.cfg
    torch.manual_seed(cfg["seed"])
    mae = MaskedAutoencoder(cfg["size"], cfg["decoder"], cfg["mask_ratio"])
    start_normalisation_at_data_stats(mae, cfg["mel_stats"])
    w.optimizer = make_optimizer(mae.parameters(), cfg)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            mae.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
            w.optimizer.load_state_dict(
                torch.load(
                    os.path.join(folder, "optimizer.pt"), map_location="cpu", weights_only=True
                )
            )
            w.start_epoch = json.loads(Path(folder, "state.json").read_text())["epoch"] + 1
    w.resumed = _resume_from_step_checkpoint(
        mae, w.optimizer, w.start_epoch * w.bpe, cfg, w.rank, w.world
    )
    if w.resumed:
        w.start_epoch, w.skip = w.resumed["epoch"], w.resumed["batch"]
    w.model = ray.train.torch.prepare_model(mae)
    if cfg["compile"]:
        w.model = torch.compile(w.model)


def _log_placement(w: _Worker) -> None:
    """Which host (name and address) each rank runs on: in the log and ``<state>/placement.json``."""
    import ray.util

    mine = {"rank": w.rank, "host": socket.gethostname(), "ip": ray.util.get_node_ip_address()}
    ranks = step_checkpoint.gather(mine, w.world)
    if w.rank == 0:
        atomic.write_json(w.state_dir / "placement.json", {"ranks": ranks})
        where = ", ".join(f"rank {r['rank']} on {r['host']} ({r['ip']})" for r in ranks)
        log.info(f"{w.world} workers on {len({r['host'] for r in ranks})} host(s): {where}")


def _open_logs(w: _Worker) -> None:
    """Rank 0: the metric files (rows of epochs to redo dropped), TensorBoard, quick checks."""
    w.steps = step_checkpoint.StepCheckpoints(w.state_dir)
    w.timer = step_checkpoint.Schedule(
        step_checkpoint.Control(w.state_dir), w.cfg["checkpoint_every_min"], w.rank, w.device
    )
    if w.rank != 0:
        return
    _truncate_csv(w.state_dir / "metrics.csv", METRIC_FIELDS, w.start_epoch)
    _truncate_csv(w.state_dir / "throughput.csv", THROUGHPUT_FIELDS, w.start_epoch)
    from torch.utils.tensorboard import SummaryWriter

    w.writer = SummaryWriter(
        str(w.state_dir / "tensorboard"), purge_step=w.start_epoch * w.bpe + w.skip
    )
    w.check = quick_checks.QuickChecks(w.cfg, w.state_dir, w.start_epoch)  # k-NN + linear probe


def _train_epoch(w: _Worker, epoch: int, parts) -> _Epoch | None:
    """The epoch's steps from ``w.skip`` on; None when a stop request ended the run (after a step
    checkpoint)."""
    cfg, bpe = w.cfg, w.bpe
    data = torch.utils.data.DataLoader(
        loader.TrainBatches(
            parts,
            cfg["global_batch"] // w.world,
            bpe,
            cfg["seed"],
            epoch,
            w.rank,
            w.world,
            cfg["shuffle_buffer"],
            skip=w.skip,
        ),
        batch_size=None,
        num_workers=cfg["loader_workers"],
        pin_memory=w.device.type == "cuda",
    )
    tally = _Epoch()
    if w.resumed and epoch == w.resumed["epoch"]:
        # the part of this epoch done before the step checkpoint
        tally.rows, tally.loss_sum = w.resumed["rows"], w.resumed["loss_sum"].to(w.device)
    started = tally.last_progress = time.perf_counter()
    fetch_start = time.perf_counter()
    for i, batch in enumerate(data, start=w.skip):
        tally.wait += time.perf_counter() - fetch_start
        step = epoch * bpe + i
        lr, loss = _train_step(w, batch, step)
        tally.loss_sum = tally.loss_sum + loss  # stays on the device: no sync per step
        if w.rank == 0 and (i % cfg["log_every"] == 0 or i == bpe - 1):
            _log_step(w, tally, epoch, step, i, lr, loss.item())
        # (the epoch's last step is followed by its epoch checkpoint instead)
        if i < bpe - 1 and _checkpoint_or_stop(w, tally, epoch, step, i):
            return None
        fetch_start = time.perf_counter()
    tally.seconds = time.perf_counter() - started
    tally.batches, w.skip = bpe - w.skip, 0
    return tally


def _train_step(w: _Worker, batch: dict, step: int):
    """One optimiser step at the schedule's learning rate; (lr, the batch loss, detached)."""
    cfg = w.cfg
    warmup_steps = int(round(cfg["warmup_epochs"] * w.bpe))
    lr = schedule.learning_rate(
        step, cfg["lr"], warmup_steps, w.total_steps, cfg["final_lr_fraction"]
    )
    for group in w.optimizer.param_groups:
        group["lr"] = lr
    gen = torch.Generator(device=w.device).manual_seed(_step_seed(cfg["seed"], step, w.rank))
    with torch.autocast(w.device.type, dtype=torch.bfloat16, enabled=w.bf16):
        out = w.model(
            batch["mel"].to(w.device, non_blocking=True),
            batch["valid_frames"].to(w.device, non_blocking=True),
            generator=gen,
        )
    out.loss.backward()
    w.optimizer.step()
    w.optimizer.zero_grad(set_to_none=True)
    return lr, out.loss.detach()


def _log_step(w: _Worker, tally: _Epoch, epoch: int, step: int, i: int, lr: float, loss: float):
    """Rank 0: a metric row (its own batch loss), TensorBoard, and progress.json (at most 1/s)."""
    row = {"epoch": epoch, "step": step, "lr": f"{lr:.8g}", "train_loss": f"{loss:.6f}"}
    tally.rows.append({**row, "val_loss": ""})
    w.writer.add_scalar("train/loss", loss, step)
    w.writer.add_scalar("train/lr", lr, step)
    now = time.perf_counter()
    if now - tally.last_progress > 1.0 or i == w.bpe - 1:
        atomic.write_json(
            w.state_dir / "progress.json",
            {"step": step + 1, "total": w.total_steps, "epoch": epoch, "loss": round(loss, 4)},
        )
        tally.last_progress = now


def _checkpoint_or_stop(w: _Worker, tally: _Epoch, epoch: int, step: int, i: int) -> bool:
    """After a step: a step checkpoint when one is due; True when the run stops here."""
    save, stop = w.timer.poll()
    if save:
        _save_step_checkpoint(
            w.steps,
            w.model,
            w.optimizer,
            step + 1,
            epoch,
            i + 1,
            tally.rows,
            tally.loss_sum,
            w.cfg,
            w.rank,
            w.world,
            "stop" if stop else "schedule",
        )
        w.timer.saved()
    if stop and w.rank == 0:
        w.timer.control.mark_stopped({"step": step + 1, "total": w.total_steps})
        w.writer.close()
    return stop


def _end_epoch(w: _Worker, epoch: int, tally: _Epoch, valid_parts) -> None:
    """Validation, the epoch's metrics and (rank 0) its rows, quick checks and checkpoint."""
    import ray.train

    cfg = w.cfg
    val_loss = validate(
        w.model,
        loader.ValidationBatches(
            valid_parts, cfg["global_batch"] // w.world, cfg["validation_rows"], w.rank, w.world
        ),
        w.device,
        cfg["seed"],
        w.bf16,
    )
    train_loss = _mean_across_ranks(float(tally.loss_sum), w.bpe, w.device)
    metrics = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss}
    if w.rank != 0:
        ray.train.report(metrics, checkpoint=None)
        w.timer.saved()
        return
    tally.rows[-1]["val_loss"] = f"{val_loss:.6f}"
    w.check.after_epoch(w.model, epoch, (epoch + 1) * w.bpe, w.writer)
    _append_csv(w.state_dir / "metrics.csv", METRIC_FIELDS, tally.rows)
    w.timer.saved()  # an epoch checkpoint is a resume point too
    samples = tally.batches * cfg["global_batch"]
    _append_csv(
        w.state_dir / "throughput.csv",
        THROUGHPUT_FIELDS,
        [
            {
                "epoch": epoch,
                "seconds": f"{tally.seconds:.3f}",
                "samples_per_s": f"{samples / tally.seconds:.2f}",
                "tokens_per_s": f"{samples * TOKENS_PER_WINDOW / tally.seconds:.1f}",
                "loader_wait_fraction": f"{tally.wait / tally.seconds:.4f}",
            }
        ],
    )
    w.writer.add_scalar("val/loss", val_loss, (epoch + 1) * w.bpe)
    w.writer.add_scalar("throughput/samples_per_s", samples / tally.seconds, epoch)
    w.writer.flush()
    _report_epoch_checkpoint(w, metrics)


def _report_epoch_checkpoint(w: _Worker, metrics: dict) -> None:
    """Rank 0: the epoch checkpoint (weights, optimiser, state) reported to Ray Train."""
    import ray.train
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(dir=w.state_dir) as folder:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in _unwrap(w.model).state_dict().items()},
            os.path.join(folder, "model.safetensors"),
        )
        torch.save(w.optimizer.state_dict(), os.path.join(folder, "optimizer.pt"))
        Path(folder, "state.json").write_text(
            json.dumps({**metrics, "step": (metrics["epoch"] + 1) * w.bpe}, sort_keys=True)
        )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


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
    if cfg.get("hang_timeout_s"):  # a worker that hangs this long is dead: its group restarts
        os.environ["RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S"] = str(cfg["hang_timeout_s"])
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
        (state / "placement.json").unlink(missing_ok=True)  # (this job's workers write it)
        with step_checkpoint.signal_handlers(control):
            return _train(cfg, params, worker_cfg, name, state, out, control, address)


def _train(cfg, params, worker_cfg, name, state, out, control, address) -> dict:
    import ray

    _start_ray(address, cfg, state)
    step_checkpoint.install_handlers(control)  # again: ray.init sets its own SIGTERM handler
    progress = _Progress(state / "progress.json", cfg["epochs"] * cfg["batches_per_epoch"])
    progress.start()
    watch = _NodeWatch(state, control)
    watch.start()
    try:
        result = _trainer(cfg, worker_cfg, name, state).fit()
    finally:
        watch.stop.set()
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
    return _export_results(cfg, params, result, name, state, out)


def _trainer(cfg: dict, worker_cfg: dict, name: str, state: Path):
    """Ray Train's TorchTrainer for ``train_worker``: one worker per GPU or per CPU slot, Ray's
    checkpoints (the best by validation loss) in the run's state folder."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
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


def _export_results(cfg: dict, params: dict, result, name: str, state: Path, out: Path) -> dict:
    """The averaged encoder, the metric files, the summary and the loss curve in ``out``."""
    best = sorted(
        ((Path(c.path), float(m["val_loss"]), int(m["epoch"])) for c, m in result.best_checkpoints),
        key=lambda item: (item[1], item[2]),
    )[: cfg["average_best"]]
    stamp = provenance.stamp(params, cfg["seed"])
    path = export(best, cfg, stamp, out)
    for name_ in ("metrics.csv", "throughput.csv", quick_checks.CSV_NAME):
        shutil.copyfile(state / name_, out / name_)
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


class _NodeWatch(threading.Thread):
    """On a cluster of several Ray nodes: when a node that was there at the start is no longer alive
    (its raylet stopped answering Ray's health checks: a lost machine, or its processes killed),
    the driver records the attempt and exits at once with :data:`step_checkpoint.EXIT_RESUME`. The
    workers cannot write a step checkpoint without the lost rank, and Ray Train cannot start the
    worker group again without the node: the next job (on nodes that work) resumes from the last
    step checkpoint. On one node, Ray Train's own restarts (``max_failures``) handle a lost worker."""

    def __init__(self, state: Path, control: step_checkpoint.Control, every_s: float = 1.0):
        super().__init__(daemon=True)
        self.state, self.control, self.every_s = state, control, every_s
        self.stop = threading.Event()

    def run(self) -> None:
        import ray

        try:
            first = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
        except Exception:  # (Ray not reachable: nothing to watch)
            return
        if len(first) < 2:
            return
        while not self.stop.wait(self.every_s):
            try:
                alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
            except Exception:
                continue
            lost = [n for node_id, n in first.items() if node_id not in alive]
            if lost and not self.stop.is_set():
                self._give_up(lost)

    def _give_up(self, lost: list[dict]) -> None:
        names = [f"{n['NodeManagerHostname']} ({n['NodeManagerAddress']})" for n in lost]
        try:
            reached = json.loads((self.state / "progress.json").read_text())["step"]
        except (OSError, ValueError, KeyError):
            reached = None
        log.error(
            f"Ray node lost: {', '.join(names)}; training reached step {reached}. Stopping with "
            f"exit status {step_checkpoint.EXIT_RESUME}: the next job resumes from the last "
            f"step checkpoint ({self.state / 'steps'})"
        )
        _record_job(self.state, self.control, None, lost=names, reached=reached)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(step_checkpoint.EXIT_RESUME)


def _record_job(
    state: Path, control: step_checkpoint.Control, result, lost=None, reached=None
) -> None:
    """One line of ``attempts.jsonl``: how this job's training ended (``result``: Ray Train's, None
    when a node was ``lost``; ``reached``: the step the training had reached then)."""
    try:
        resumed = json.loads((state / "resume.json").read_text())
    except (OSError, ValueError):
        resumed = {}
    try:
        placement = json.loads((state / "placement.json").read_text())["ranks"]
    except (OSError, ValueError, KeyError):
        placement = None
    stopped = control.stopped()
    outcome = (
        "node lost" if lost else "error" if result.error else "stopped" if stopped else "finished"
    )
    entry = {
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "outcome": outcome,
        "resumed_from": resumed.get("from"),
        "start_step": resumed.get("step"),
        "end_step": stopped["step"] if stopped and not lost else None,
        "signal": control.stop_reason() if stopped and not lost else None,
        "hosts": [f"{r['host']} ({r['ip']})" for r in placement] if placement else None,
        "time": round(time.time(), 3),
    }
    if lost:
        entry |= {"lost": lost, "reached_step": reached}
    step_checkpoint.record_attempt(state, entry)


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
