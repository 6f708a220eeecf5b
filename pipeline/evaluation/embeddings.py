"""Embeddings of every clip of a HEAR task, for one model: ``python -m dasheng_pipeline.evaluation.embeddings``.

Writes a folder holding, per split, ``<split>.npz`` with

- ``files`` (N,) the clip file names (as in the split JSON), sorted;
- ``clip`` (N, D) float32 clip embeddings (the mean of the 25 Hz frames);
- ``frames`` (ΣT, D) float32, ``timestamps`` (ΣT,) float32 ms (frame centres) and ``offsets`` (N+1,)
  int64 (clip i's frames are ``frames[offsets[i]:offsets[i+1]]``), unless frames are not stored
  (``frames: events`` stores them for event tasks only);

plus ``rejects.json`` (every clip that could not be embedded: missing wav, undecodable, with the
reason; also printed to the log) and ``meta.json`` (model, task, dimensions, counts, provenance),
written last. The probe and k-NN steps read these without the encoder.

``--dtype fp32|bf16`` (the DAG passes ``evaluation.dtype``): bf16 runs our encoders (``checkpoint``,
``random``) under bf16 autocast (``dasheng_model.embed``); the log-mel baseline and HEAR modules always run
as they are. ``meta.json`` records the precision used.

Models (``spec["type"]``):

- ``checkpoint``: our ``.safetensors`` (encoder or MAE), an official Dasheng ``.pt`` release, or a
  Hugging Face-format folder or repo id (``dasheng_model.pretrained.load``);
- ``random``: a random-init encoder of ``size`` from ``seed`` (``dasheng_model.pretrained.random_encoder``);
- ``logmel``: the baseline: clip = mean over time of the 64-bin dB log-mel; frames = the log-mel
  averaged over groups of 4 frames (25 Hz, the encoder's frame rate and timestamps);
- ``hear_module``: any importable module with the HEAR API (``load_model(path)``,
  ``get_scene_embeddings``, ``get_timestamp_embeddings``); audio is decoded at its ``sample_rate``.

``layer`` (``checkpoint``, ``random``; and ``hear_module``, passed to its ``load_model`` when set):
``last`` (the default and the paper's protocol), a block number, or ``mean`` of all blocks
(``dasheng_model.embed``). ``--layer`` on the command line overrides the spec's.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from dasheng_model.embed import check_layer, embed, frame_times_ms
from dasheng_model.frontend import LogMel
from dasheng_model.inputs import DTYPES, FRAMES_PER_TOKEN, SAMPLES_PER_TOKEN, check_dtype
from dasheng_pipeline.common import atomic, audio, logs, provenance
from dasheng_pipeline.evaluation.tasks import hear as hear_tasks

log = logging.getLogger(__name__)

MODEL_TYPES = ("checkpoint", "random", "logmel", "hear_module")


class Embedder:
    """Turns a batch of waveforms into (frames (T, D), timestamps (T,) ms, clip (D,)) per clip."""

    sample_rate = audio.SAMPLE_RATE
    dim: int
    description: str
    dtype = "fp32"  # the precision it runs in

    def __call__(self, batch: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        raise NotImplementedError


class EncoderEmbedder(Embedder):
    def __init__(self, encoder, description: str, dtype: str = "fp32", layer="last"):
        self.encoder = encoder.eval()
        self.dim = encoder.embed_dim
        self.dtype = check_dtype(dtype)
        self.layer = check_layer(layer, len(encoder.blocks))
        description = description if self.layer == "last" else f"{description}, layer {self.layer}"
        self.description = (
            description if self.dtype == "fp32" else f"{description}, {self.dtype} autocast"
        )

    def __call__(self, batch):
        longest = max(SAMPLES_PER_TOKEN, max(x.size for x in batch))
        wav = torch.zeros(len(batch), longest)
        lengths = torch.empty(len(batch), dtype=torch.long)
        for i, x in enumerate(batch):
            wav[i, : x.size] = torch.from_numpy(x)
            lengths[i] = max(SAMPLES_PER_TOKEN, x.size)
        out = embed(self.encoder, wav, lengths=lengths, dtype=self.dtype, layer=self.layer)
        results = []
        for i in range(len(batch)):
            n = int(out.num_frames[i])
            results.append(
                (out.frames[i, :n].numpy(), frame_times_ms(n).numpy(), out.clip[i].numpy())
            )
        return results


class LogMelEmbedder(Embedder):
    dim = 64
    description = "log-mel mean (64-d dB log-mel; frames: means of 4 mel frames, 25 Hz)"

    def __init__(self):
        self.logmel = LogMel().eval()

    def __call__(self, batch):
        results = []
        with torch.no_grad():
            for x in batch:
                if x.size < SAMPLES_PER_TOKEN:
                    x = np.pad(x, (0, SAMPLES_PER_TOKEN - x.size))
                mel = self.logmel(torch.from_numpy(x)[None])[0]  # (64, T)
                T = mel.shape[1] // FRAMES_PER_TOKEN
                frames = (
                    mel[:, : T * FRAMES_PER_TOKEN].reshape(64, T, FRAMES_PER_TOKEN).mean(-1).T
                )  # (T, 64)
                results.append((frames.numpy(), frame_times_ms(T).numpy(), mel.mean(dim=1).numpy()))
        return results


class HearModuleEmbedder(Embedder):
    """Any module with the HEAR 2021 API. Clips of equal length go through it together."""

    def __init__(self, module_name: str, path: str, layer=None):
        try:
            self.module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"models: cannot import HEAR module {module_name!r}: {exc}") from exc
        missing = [
            f
            for f in ("load_model", "get_scene_embeddings", "get_timestamp_embeddings")
            if not callable(getattr(self.module, f, None))
        ]
        if missing:
            raise ValueError(
                f"models: module {module_name!r} lacks the HEAR API functions {missing}"
            )
        kwargs = {} if layer in (None, "last") else {"layer": layer}
        try:
            self.model = (
                self.module.load_model(path, **kwargs) if path else self.module.load_model(**kwargs)
            )
        except TypeError as exc:
            if not kwargs:
                raise
            raise ValueError(
                f"models: {module_name}.load_model() does not take layer={layer!r} ({exc}); "
                f"leave the model's layer unset"
            ) from exc
        for attr in ("sample_rate", "scene_embedding_size", "timestamp_embedding_size"):
            if not hasattr(self.model, attr):
                raise ValueError(
                    f"models: {module_name}.load_model() returned a model without {attr!r}"
                )
        self.sample_rate = int(self.model.sample_rate)
        self.dim = int(self.model.scene_embedding_size)
        self.description = f"HEAR module {module_name} ({path or 'no weights file'})" + (
            f", layer {layer}" if kwargs else ""
        )
        self.device = (
            next((p.device for p in self.model.parameters()), torch.device("cpu"))
            if isinstance(self.model, torch.nn.Module)
            else torch.device("cpu")
        )

    def __call__(self, batch):
        results: list = [None] * len(batch)
        by_length: dict[int, list[int]] = collections.defaultdict(list)
        for i, x in enumerate(batch):
            by_length[x.size].append(i)
        with torch.no_grad():
            for idx in by_length.values():
                wav = torch.from_numpy(np.stack([batch[i] for i in idx])).to(self.device)
                emb, ts = self.module.get_timestamp_embeddings(wav, self.model)
                scene = self.module.get_scene_embeddings(wav, self.model)
                for j, i in enumerate(idx):
                    results[i] = (
                        emb[j].float().cpu().numpy(),
                        ts[j].float().cpu().numpy(),
                        scene[j].float().cpu().numpy(),
                    )
        return results


def build_embedder(spec: dict, seed: int = 0, dtype: str = "fp32") -> Embedder:
    """``dtype`` ("fp32"/"bf16") applies to our encoders (checkpoint, random) only."""
    kind = spec.get("type")
    if kind == "checkpoint":
        from dasheng_model.pretrained import load

        path = spec.get("path")
        if not path:
            raise ValueError("models: a 'checkpoint' model needs a 'path'")
        return EncoderEmbedder(load(path), f"checkpoint {path}", dtype, spec.get("layer") or "last")
    if kind == "random":
        from dasheng_model.pretrained import random_encoder

        size = spec.get("size") or "base"
        model_seed = spec.get("seed")
        model_seed = seed if model_seed is None else int(model_seed)
        return EncoderEmbedder(
            random_encoder(size, model_seed),
            f"random-init {size} encoder (seed {model_seed})",
            dtype,
            spec.get("layer") or "last",
        )
    if kind == "logmel":
        if spec.get("layer") not in (None, "last"):
            raise ValueError(
                f"models: the log-mel baseline has no layers (layer {spec['layer']!r}); leave layer unset"
            )
        return LogMelEmbedder()
    if kind == "hear_module":
        if not spec.get("module"):
            raise ValueError("models: a 'hear_module' model needs a 'module' (importable name)")
        return HearModuleEmbedder(spec["module"], spec.get("path") or "", spec.get("layer"))
    raise ValueError(f"models: unknown model type {kind!r}; expected one of {MODEL_TYPES}")


def prefetch(
    fn: Callable, items: Iterable, workers: int, ahead: int
) -> Iterator[tuple[object, Future]]:
    """Yield ``(item, future of fn(item))`` in order, with at most ``ahead`` calls in flight."""
    items = list(items)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: collections.deque = collections.deque()
        it = iter(items)
        for item in it:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= ahead:
                yield pending.popleft()
        while pending:
            yield pending.popleft()


def embed_split(
    embedder: Embedder,
    clips: list[hear_tasks.Clip],
    batch_size: int,
    decode_threads: int,
    desc: str,
) -> tuple[dict, list[hear_tasks.Reject]]:
    """Embed a split's clips; returns arrays for the npz and the clips that failed to decode."""
    from tqdm import tqdm

    files, clip_emb, frames, stamps, counts, rejects = [], [], [], [], [], []
    batch: list[tuple[hear_tasks.Clip, np.ndarray]] = []

    def flush():
        if not batch:
            return
        for (clip, _), (f, ts, c) in zip(batch, embedder([x for _, x in batch])):
            files.append(clip.file)
            clip_emb.append(np.asarray(c, np.float32))
            frames.append(np.asarray(f, np.float32))
            stamps.append(np.asarray(ts, np.float32))
            counts.append(f.shape[0])
        batch.clear()

    decode = lambda c: hear_tasks.load_audio(c, embedder.sample_rate)  # noqa: E731
    for clip, fut in tqdm(
        prefetch(decode, clips, decode_threads, 4 * batch_size),
        total=len(clips),
        desc=desc,
        unit="clip",
        file=sys.stdout,
        mininterval=5,
    ):
        try:
            x = fut.result()
        except audio.DecodeError as exc:
            rejects.append(hear_tasks.Reject(clip.split, clip.file, f"undecodable: {exc.reason}"))
            continue
        if x.size == 0:
            rejects.append(
                hear_tasks.Reject(clip.split, clip.file, "no audio decoded (empty file)")
            )
            continue
        if not np.isfinite(x).all():
            rejects.append(hear_tasks.Reject(clip.split, clip.file, "NaN or infinite samples"))
            continue
        batch.append((clip, x))
        if len(batch) >= batch_size:
            flush()
    flush()
    dim = embedder.dim
    arrays = {
        "files": np.array(files, dtype=str),
        "clip": np.stack(clip_emb) if clip_emb else np.zeros((0, dim), np.float32),
        "frames": np.concatenate(frames) if frames else np.zeros((0, dim), np.float32),
        "timestamps": np.concatenate(stamps) if stamps else np.zeros(0, np.float32),
        "offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
    }
    return arrays, rejects


def save_npz(path: Path, arrays: dict) -> None:
    with atomic.atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def load_split(folder: str | Path, split: str) -> dict[str, np.ndarray]:
    """One split's arrays as written by :func:`run` (no pickles)."""
    with np.load(Path(folder) / f"{split}.npz", allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def load_meta(folder: str | Path) -> dict:
    with open(Path(folder) / "meta.json", encoding="utf-8") as fh:
        return json.load(fh)


def run(
    task_dir: str | Path,
    model_name: str,
    spec: dict,
    params: dict,
    out: str | Path,
    threads: int = 1,
    dtype: str = "fp32",
) -> dict:
    dtype = check_dtype(dtype)
    torch.set_num_threads(max(1, threads))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic.clean_stale_temps(out)
    seed = int(params.get("seed", 0))
    task = hear_tasks.load_task(task_dir)
    store_frames = params.get("frames", "all") == "all" or task.is_event
    t0 = time.perf_counter()
    embedder = build_embedder(spec, seed, dtype)
    log.info(
        f"model {model_name}: {embedder.description}, {embedder.dim}-d; task {task.name} "
        f"({task.embedding_type}, {task.split_mode}, audio {task.sample_rate} Hz → {embedder.sample_rate} Hz)"
    )
    all_rejects: list[hear_tasks.Reject] = []
    counts = {}
    for split in task.splits:
        clips, rejects = task.clips(split)
        for r in rejects:
            log.warning(f"task {task.name!r}, split {split!r}: skipped {r.file!r}: {r.reason}")
        arrays, bad = embed_split(
            embedder,
            clips,
            int(params.get("batch_size", 16)),
            int(params.get("decode_threads", 2)),
            f"{model_name}/{task.name}/{split}",
        )
        for r in bad:
            log.warning(f"task {task.name!r}, split {split!r}: skipped {r.file!r}: {r.reason}")
        rejects += bad
        all_rejects += rejects
        if arrays["files"].size == 0:
            atomic.write_json(out / "rejects.json", {"rejects": [r.as_dict() for r in all_rejects]})
            raise hear_tasks.TaskError(
                f"task {task.name!r}, file {str(task.root / (split + '.json'))!r}: no usable clip in split {split!r} "
                f"({len(rejects)} rejected, see {out / 'rejects.json'})"
            )
        if not store_frames:
            arrays = {k: arrays[k] for k in ("files", "clip")}
        save_npz(out / f"{split}.npz", arrays)
        counts[split] = {
            "clips": int(arrays["files"].size),
            "rejected": len(rejects),
            "frames": int(arrays["frames"].shape[0]) if "frames" in arrays else None,
        }
    elapsed = time.perf_counter() - t0
    n = sum(c["clips"] for c in counts.values())
    log.info(
        f"embedded {n} clips in {elapsed:.1f} s ({n / max(elapsed, 1e-9):.1f} clips/s); "
        f"rejected {len(all_rejects)}"
    )
    atomic.write_json(out / "rejects.json", {"rejects": [r.as_dict() for r in all_rejects]})
    meta = {
        "model": model_name,
        "model_spec": spec,
        "model_description": embedder.description,
        "dim": embedder.dim,
        "sample_rate": embedder.sample_rate,
        "task": task.name,
        "task_dir": str(task_dir),
        "embedding_type": task.embedding_type,
        "frames_stored": store_frames,
        "dtype": embedder.dtype,
        "splits": counts,
        "rejected": len(all_rejects),
        "provenance": provenance.stamp(
            {"model": spec, "params": params, "task": task.name, "dtype": embedder.dtype},
            seed,
            audio.versions(),
        ),
    }
    atomic.write_json(out / "meta.json", meta)
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dasheng_pipeline.evaluation.embeddings",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--task", required=True, help="HEAR task folder")
    parser.add_argument("--model", required=True, help="model name (for messages and meta.json)")
    parser.add_argument(
        "--spec", required=True, help="JSON model spec: type, path, size, seed, module"
    )
    parser.add_argument(
        "--params", default="{}", help="JSON: seed, batch_size, frames, decode_threads"
    )
    parser.add_argument(
        "--layer", default=None, help="last | N (block 1..depth) | mean; overrides the spec's layer"
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--dtype",
        default="fp32",
        choices=sorted(DTYPES),
        help="precision of our encoders: fp32, or bf16 autocast (CPU or GPU)",
    )
    args = parser.parse_args(argv)
    logs.setup()
    with logs.one_line_errors():
        spec = json.loads(args.spec)
        if args.layer is not None:
            spec["layer"] = args.layer
        run(
            args.task, args.model, spec, json.loads(args.params), args.out, args.threads, args.dtype
        )


if __name__ == "__main__":
    main()
