"""Step checkpoints, stop requests and the job-to-job hand-over of a long training run.

An epoch-end checkpoint (Ray's, with the validation loss; the best ones are averaged) can be hours
apart at paper scale. A **step checkpoint** is written inside an epoch — every
``training.checkpoint_every_min`` minutes, on request (SIGUSR2 to the driver) and when the job is
asked to stop (SLURM's warning signal, SIGTERM, SIGUSR1) — and holds everything needed to continue
bit for bit:

* ``model.safetensors`` (the MAE's weights and buffers) and ``optimizer.pt`` (the optimiser's state
  dict, 8-bit AdamW's quantised state included; read back with ``torch.load(weights_only=True)``),
  written by rank 0 (DDP keeps both identical on every rank);
* ``ranks.pt``: every rank's RNG states (torch CPU and CUDA, numpy, Python) and its running sum of
  the epoch's training losses, gathered to rank 0;
* ``manifest.json``, written last: the global step, the epoch and the batch inside it (the loader
  recreates every stream's position, shuffle buffer included, from the seed schedule and that
  number: ``pipeline/training/loader.py``), the world layout, the metric rows of the unfinished
  epoch, and the sha256 of every file.

A checkpoint is written to a temporary folder and renamed to ``steps/step-<step>`` when complete,
so a kill -9 leaves at most a ``.tmp-`` folder. On resume the newest one whose files match their
sha256 is used; a damaged or half-written one is named in the log, moved to ``steps/.damaged/`` and
never loaded, and the one before it is used. The last :data:`KEEP` are kept.

Stop requests travel from the driver (which gets the signals) to the Ray workers as files in
``control/``; rank 0 polls them after every step and all ranks agree through one all-reduce, so every
rank stops after the same step. A stopped run exits with :data:`EXIT_RESUME` ("not finished, resume
me"); Snakemake's retries then start the next job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dasheng_pipeline.common import atomic

log = logging.getLogger(__name__)

KEEP = 2
EXIT_RESUME = 75  # EX_TEMPFAIL: not finished, run me again (the next job resumes)
STOP_SIGNALS = (
    "SIGURG",
    "SIGTERM",
    "SIGUSR1",
)  # SIGURG: SLURM's warning (--signal), see training.smk
CHECKPOINT_SIGNAL = "SIGUSR2"
MANIFEST = "manifest.json"


class CheckpointDamaged(ValueError):
    """A step checkpoint whose files are missing or do not match their sha256."""


# --------------------------------------------------------------------------- RNG states


def rng_state() -> dict:
    """This process's RNG states (torch CPU and CUDA, numpy's global, Python's)."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": json.dumps(_np_state()),
        "python": json.dumps(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = json.loads(state["numpy"])
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _np_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


# --------------------------------------------------------------------------- the checkpoints


@dataclass(frozen=True)
class StepCheckpoint:
    path: Path
    manifest: dict

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    def model_state(self) -> dict:
        from safetensors.torch import load_file

        return load_file(str(self.path / "model.safetensors"))

    def optimizer_state(self) -> dict:
        return torch.load(self.path / "optimizer.pt", map_location="cpu", weights_only=True)

    def rank_state(self, rank: int) -> dict:
        ranks = torch.load(self.path / "ranks.pt", map_location="cpu", weights_only=True)
        return ranks[rank]


class StepCheckpoints:
    """The step checkpoints of one run: ``<state>/steps/step-<step>/``."""

    def __init__(self, state_dir: str | os.PathLike):
        self.folder = Path(state_dir) / "steps"

    def save(
        self, step: int, model_state: dict, optimizer_state: dict, ranks: list[dict], info: dict
    ) -> Path:
        """Write one checkpoint atomically (a temporary folder renamed when complete), then prune."""
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"step-{step:09d}"
        tmp = atomic.temp_path_for(final)
        tmp.mkdir()
        try:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in model_state.items()},
                str(tmp / "model.safetensors"),
            )
            torch.save(optimizer_state, tmp / "optimizer.pt")
            torch.save(ranks, tmp / "ranks.pt")
            files = {}
            for name in ("model.safetensors", "optimizer.pt", "ranks.pt"):
                atomic.fsync_path(tmp / name)
                files[name] = atomic.sha256_file(tmp / name)
            atomic.write_json(tmp / MANIFEST, {**info, "step": step, "files": files})
            atomic.fsync_path(tmp)
            if final.exists():  # the same step again (a resumed run stopped before its next step)
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic.fsync_path(self.folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.prune()
        return final

    def folders(self) -> list[Path]:
        """The committed checkpoint folders, newest first (never a ``.tmp-`` one still being written)."""
        if not self.folder.is_dir():
            return []
        return sorted(
            (
                p
                for p in self.folder.glob("step-*")
                if p.is_dir() and atomic.TEMP_MARK not in p.name
            ),
            key=lambda p: p.name,
            reverse=True,
        )

    def prune(self) -> None:
        for old in self.folders()[KEEP:]:
            shutil.rmtree(old, ignore_errors=True)
        for tmp in self.folder.glob(f"step-*{atomic.TEMP_MARK}*"):  # left by a killed writer
            if tmp.stat().st_mtime < time.time() - 3600:
                shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def verify(path: Path) -> StepCheckpoint:
        """The checkpoint in ``path`` after checking every file against its sha256."""
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            files = manifest["files"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointDamaged(
                f"{path}: no readable {MANIFEST} (a half-written checkpoint?): {exc}"
            ) from None
        for name, expected in files.items():
            if not (path / name).is_file():
                raise CheckpointDamaged(f"{path}: {name} is missing")
            got = atomic.sha256_file(path / name)
            if got != expected:
                raise CheckpointDamaged(
                    f"{path}: {name} has sha256 {got[:16]}..., the manifest says {expected[:16]}..."
                )
        return StepCheckpoint(path, manifest)

    def latest(self) -> StepCheckpoint | None:
        """The newest intact checkpoint; damaged ones are named, moved to ``.damaged/`` and skipped."""
        for path in self.folders():
            try:
                return self.verify(path)
            except CheckpointDamaged as exc:
                aside = self.folder / ".damaged" / path.name
                aside.parent.mkdir(exist_ok=True)
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(path, aside)
                log.warning(
                    f"step checkpoint skipped: {exc}; moved to {aside}, using the one before it"
                )
        return None


# --------------------------------------------------------------------------- one driver per run

LOCK_WAIT_S = 120.0


class RunBusy(RuntimeError):
    """Another training driver still holds the run's state folder."""


@contextlib.contextmanager
def driver_lock(state_dir: str | os.PathLike, wait_s: float = LOCK_WAIT_S):
    """Hold ``<state>/driver.lock`` (``flock``) for the block: one training driver per run.

    A job killed at its time limit can leave its driver behind for a while (on clusters that track
    a job's processes by parent, not by cgroup, such a process outlives its job); the next job
    waits up to ``wait_s`` for it to exit before it touches the checkpoints, then gives up with
    :class:`RunBusy` naming the holder. The kernel drops the lock when the holder dies, kill -9
    included, so a stale lock file never blocks.
    """
    import fcntl

    path = Path(state_dir) / "driver.lock"
    fh = open(path, "a+")
    try:
        deadline, warned = time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "unknown"
                if time.monotonic() >= deadline:
                    raise RunBusy(
                        f"{path}: another training driver still holds this run ({holder}) after "
                        f"{wait_s:.0f} s; let it finish or stop it, then run again"
                    ) from None
                if not warned:
                    log.warning(
                        f"another training driver still holds this run ({holder}): waiting up to "
                        f"{wait_s:.0f} s for it to exit"
                    )
                    warned = True
                time.sleep(0.5)
        fh.seek(0)
        fh.truncate()
        fh.write(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": os.uname().nodename,
                    "slurm_job": os.environ.get("SLURM_JOB_ID"),
                },
                sort_keys=True,
            )
            + "\n"
        )
        fh.flush()
        yield
    finally:
        fh.close()  # (closing drops the lock)


# --------------------------------------------------------------------------- stop requests


class Control:
    """Requests from the driver to the workers, as files in ``<state>/control/``."""

    def __init__(self, state_dir: str | os.PathLike):
        self.folder = Path(state_dir) / "control"
        self.stop_file, self.checkpoint_file = self.folder / "stop", self.folder / "checkpoint"
        self.stopped_file = self.folder / "stopped.json"

    def clear(self) -> None:
        """At the start of a job: requests of the previous job are done with."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for path in (self.stop_file, self.checkpoint_file, self.stopped_file):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def request_stop(self, reason: str) -> None:
        atomic.write_bytes(self.stop_file, (reason + "\n").encode())

    def request_checkpoint(self) -> None:
        atomic.write_bytes(self.checkpoint_file, b"requested\n")

    def stop_requested(self) -> bool:
        return self.stop_file.exists()

    def take_checkpoint_request(self) -> bool:
        try:
            self.checkpoint_file.unlink()
            return True
        except FileNotFoundError:
            return False

    def mark_stopped(self, info: dict) -> None:
        atomic.write_json(self.stopped_file, info)

    def stopped(self) -> dict | None:
        try:
            return json.loads(self.stopped_file.read_text())
        except (OSError, ValueError):
            return None

    def stop_reason(self) -> str:
        try:
            return self.stop_file.read_text().strip()
        except OSError:
            return "a stop request"


def install_handlers(control: Control) -> dict:
    """In the driver: stop signals ask the workers to checkpoint and stop; SIGUSR2 asks for a
    checkpoint. Returns the previous handlers."""

    def stop(signum, _frame):
        name = signal.Signals(signum).name
        log.warning(
            f"{name} received: the workers finish their step, write a step checkpoint and stop"
        )
        control.request_stop(name)

    def checkpoint(_signum, _frame):
        log.info(f"{CHECKPOINT_SIGNAL} received: a step checkpoint after the current step")
        control.request_checkpoint()

    previous = {name: signal.signal(getattr(signal, name), stop) for name in STOP_SIGNALS}
    previous[CHECKPOINT_SIGNAL] = signal.signal(getattr(signal, CHECKPOINT_SIGNAL), checkpoint)
    return previous


@contextlib.contextmanager
def signal_handlers(control: Control):
    """:func:`install_handlers` for the block (call it again inside after ``ray.init``, which sets
    its own SIGTERM handler); the previous handlers come back afterwards."""
    previous = install_handlers(control)
    try:
        yield
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)


class Schedule:
    """In every worker: after each step, whether to write a step checkpoint and whether to stop.
    Rank 0 decides (its clock, the control files); one all-reduce makes every rank agree."""

    def __init__(self, control: Control, every_min: float, rank: int, device):
        self.control, self.rank, self.device = control, rank, device
        self.every_s = every_min * 60.0
        self.last = time.monotonic()

    def saved(self) -> None:
        self.last = time.monotonic()

    def poll(self) -> tuple[bool, bool]:
        """(write a checkpoint now, stop after it)."""
        import torch.distributed as dist

        flags = torch.zeros(2, dtype=torch.float32, device=self.device)
        if self.rank == 0:
            stop = self.control.stop_requested()
            due = (
                stop
                or self.control.take_checkpoint_request()
                or (self.every_s > 0 and time.monotonic() - self.last >= self.every_s)
            )
            flags[0], flags[1] = float(due), float(stop)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        due, stop = (bool(v) for v in flags.tolist())
        return due, stop


def gather(obj, world: int) -> list:
    """``obj`` of every rank, on every rank (rank order)."""
    import torch.distributed as dist

    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj, rank: int):
    """Rank 0's ``obj`` on every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def record_attempt(state_dir: str | os.PathLike, entry: dict) -> None:
    """One line per job of the run in ``<state>/attempts.jsonl`` (the job history across SLURM jobs)."""
    path = Path(state_dir) / "attempts.jsonl"
    with open(path, "a") as fh:
        fh.write(json.dumps(entry, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
