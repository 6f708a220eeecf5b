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

``--dtype fp32|bf16`` (the DAG passes ``evaluation.dtype``): bf16 runs our encoders under bf16
autocast (``dasheng_model.embed``); the log-mel baseline and HEAR modules always run as they are.
``meta.json`` records the precision used, the model spec and its weights' sha256.

Models are named by the same spec string as on the command line (``--spec``; the DAG resolves its
``models:`` entries to it in ``dasheng_pipeline.plan``; as JSON ``{"spec": ..., "layer": ...}``):

- a checkpoint: our ``.safetensors`` (encoder or MAE), an official Dasheng ``.pt`` release, or a
  Hugging Face-format folder or repo id (``dasheng_model.pretrained.load``);
- ``random:<size>[:<seed>]``: a random-init encoder (``dasheng_model.pretrained.random_encoder``);
- ``logmel``: the baseline: clip = mean over time of the 64-bin dB log-mel; frames = the log-mel
  averaged over groups of 4 frames (25 Hz, the encoder's frame rate and timestamps);
- ``hear:<module>[:<path>]``: any importable module with the HEAR API (``load_model(path)``,
  ``get_scene_embeddings``, ``get_timestamp_embeddings``); audio is decoded at its ``sample_rate``.

Our encoders embed each clip in 10.08 s windows of its own log-mel through
``dasheng_model.windows`` (the batcher every embedding path uses).

``layer`` (encoders; and HEAR modules, passed to their ``load_model`` when set): ``last`` (the
default and the paper's protocol), a block number, or ``mean`` of all blocks
(``dasheng_model.embed``). ``--layer`` on the command line overrides the spec's.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
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

from dasheng_model import pretrained
from dasheng_model.embed import check_layer, frame_times_ms
from dasheng_model.frontend import MEL_PARAMS, LogMel
from dasheng_model.inputs import DTYPES, FRAMES_PER_TOKEN, SAMPLES_PER_TOKEN, check_dtype
from dasheng_model.windows import embed_mels
from dasheng_pipeline.common import atomic, audio, logs, provenance
from dasheng_pipeline.evaluation.tasks import hear as hear_tasks

log = logging.getLogger(__name__)

LOGMEL = "logmel"
HEAR_PREFIX = "hear:"
SPEC_FORMS = (
    "a checkpoint file or folder, a Hugging Face repo id, random:<size>[:<seed>], logmel "
    "or hear:<module>[:<path>]"
)


class Embedder:
    """Turns a batch of waveforms into (frames (T, D), timestamps (T,) ms, clip (D,)) per clip."""

    sample_rate = audio.SAMPLE_RATE
    dim: int
    description: str
    dtype = "fp32"  # the precision it runs in
    spec = ""  # the model spec string
    sha256 = ""  # of the weights (the log-mel baseline: of its parameters)

    def __call__(self, batch: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        raise NotImplementedError


class EncoderEmbedder(Embedder):
    def __init__(
        self, encoder, description: str, dtype: str = "fp32", layer="last", batch_size: int = 16
    ):
        self.encoder = encoder.eval()
        self.dim = encoder.embed_dim
        self.dtype = check_dtype(dtype)
        self.layer = check_layer(layer, len(encoder.blocks))
        self.batch_size = batch_size  # 10 s windows per forward pass
        self.logmel = LogMel()
        description = description if self.layer == "last" else f"{description}, layer {self.layer}"
        self.description = (
            description if self.dtype == "fp32" else f"{description}, {self.dtype} autocast"
        )

    def __call__(self, batch):
        mels = []
        with torch.no_grad():
            for x in batch:  # at least one token: shorter clips padded with silence
                x = np.pad(x, (0, max(0, SAMPLES_PER_TOKEN - x.size)))
                mels.append(self.logmel(torch.from_numpy(x)[None])[0])
        # the batch's clips together: padded (masked) when their lengths differ
        pool = self.batch_size - 1
        out = embed_mels(self.encoder, mels, self.batch_size, self.dtype, self.layer, pool)
        return [
            (frames.numpy(), frame_times_ms(frames.shape[0]).numpy(), clip.numpy())
            for frames, clip in out
        ]


class LogMelEmbedder(Embedder):
    dim = 64
    description = "log-mel mean (64-d dB log-mel; frames: means of 4 mel frames, 25 Hz)"
    spec = LOGMEL
    sha256 = hashlib.sha256(atomic.canonical_json(MEL_PARAMS).encode()).hexdigest()

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


def parse_spec(spec) -> tuple[str, object]:
    """A model as ``--spec`` gives it → (spec string, layer or None): a spec string, or the DAG's
    ``{"spec": ..., "layer": ...}`` (``dasheng_pipeline.plan.model_spec``)."""
    if isinstance(spec, dict):
        if not isinstance(spec.get("spec"), str) or not spec["spec"]:
            raise ValueError(
                f"model {json.dumps(spec, sort_keys=True)}: expected {{'spec': <model spec>, "
                f"'layer': ...}} with a model spec string ({SPEC_FORMS})"
            )
        return spec["spec"], spec.get("layer")
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"model {spec!r}: expected a model spec string ({SPEC_FORMS})")
    return spec, None


def _hear_embedder(spec: str, layer) -> HearModuleEmbedder:
    module, _, path = spec[len(HEAR_PREFIX) :].partition(":")
    if not module:
        raise ValueError(f"model {spec!r}: name the module, hear:<module>[:<path>]")
    embedder = HearModuleEmbedder(module, path, layer)
    embedder.spec = spec
    weights = Path(path).expanduser() if path else None
    if weights is not None and weights.is_file():
        embedder.sha256 = atomic.sha256_file(weights)
    else:  # no weights file: the spec names the model
        embedder.sha256 = hashlib.sha256(spec.encode()).hexdigest()
    return embedder


def build_embedder(spec, seed: int = 0, dtype: str = "fp32", batch_size: int = 16) -> Embedder:
    """A model spec string (or ``{"spec": ..., "layer": ...}``) → its Embedder; ``dtype``
    ("fp32"/"bf16") applies to our encoders only. (``seed`` is unused: a random encoder's seed is
    part of its spec, ``random:<size>:<seed>``, 0 when left out.)"""
    if isinstance(spec, Embedder):  # built already (the evaluate command checks its sha256 first)
        return spec
    text, layer = parse_spec(spec)
    if text == LOGMEL:
        if layer not in (None, "last"):
            raise ValueError(
                f"models: the log-mel baseline has no layers (layer {layer!r}); leave layer unset"
            )
        return LogMelEmbedder()
    if text.startswith(HEAR_PREFIX):
        return _hear_embedder(text, layer)
    encoder = pretrained.load(text)
    if text.startswith(pretrained.RANDOM_PREFIX):
        size, model_seed = pretrained.parse_random(text)
        description = f"random-init {size} encoder (seed {model_seed})"
    else:
        description = f"checkpoint {text}"
    embedder = EncoderEmbedder(encoder, description, dtype, layer or "last", batch_size)
    embedder.spec, embedder.sha256 = text, pretrained.weights_sha256(text, encoder)
    return embedder


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


def _embed_splits(
    task: hear_tasks.Task, embedder: Embedder, params: dict, model_name: str, out: Path
) -> tuple[dict, list[hear_tasks.Reject]]:
    """Every split into ``out/<split>.npz``; returns the counts per split and every reject."""
    store_frames = params.get("frames", "all") == "all" or task.is_event
    all_rejects: list[hear_tasks.Reject] = []
    counts = {}
    for split in task.splits:
        clips, rejects = task.clips(split)
        arrays, bad = embed_split(
            embedder,
            clips,
            int(params.get("batch_size", 16)),
            int(params.get("decode_threads", 2)),
            f"{model_name}/{task.name}/{split}",
        )
        rejects += bad
        for r in rejects:
            log.warning(f"task {task.name!r}, split {split!r}: skipped {r.file!r}: {r.reason}")
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
    return counts, all_rejects


def run(
    task_dir: str | Path,
    model_name: str,
    spec: str | dict,
    params: dict,
    out: str | Path,
    threads: int = 1,
    dtype: str = "fp32",
) -> dict:
    """Embed every split of the HEAR task at ``task_dir`` with the model ``spec`` (a spec string,
    or ``{"spec": ..., "layer": ...}``) into ``out``; returns (and writes) ``meta.json``."""
    dtype = check_dtype(dtype)
    torch.set_num_threads(max(1, threads))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic.clean_stale_temps(out)
    seed = int(params.get("seed", 0))
    task = hear_tasks.load_task(task_dir)
    t0 = time.perf_counter()
    embedder = build_embedder(spec, seed, dtype, int(params.get("batch_size", 16)))
    log.info(
        f"model {model_name}: {embedder.description}, {embedder.dim}-d; task {task.name} "
        f"({task.embedding_type}, {task.split_mode}, audio {task.sample_rate} Hz → {embedder.sample_rate} Hz)"
    )
    counts, rejects = _embed_splits(task, embedder, params, model_name, out)
    elapsed = time.perf_counter() - t0
    n = sum(c["clips"] for c in counts.values())
    log.info(
        f"embedded {n} clips in {elapsed:.1f} s ({n / max(elapsed, 1e-9):.1f} clips/s); "
        f"rejected {len(rejects)}"
    )
    atomic.write_json(out / "rejects.json", {"rejects": [r.as_dict() for r in rejects]})
    meta = {
        "model": model_name,
        "model_spec": embedder.spec if isinstance(spec, Embedder) else spec,
        "model_sha256": embedder.sha256,
        "model_description": embedder.description,
        "dim": embedder.dim,
        "sample_rate": embedder.sample_rate,
        "task": task.name,
        "task_dir": str(task_dir),
        "embedding_type": task.embedding_type,
        "frames_stored": params.get("frames", "all") == "all" or task.is_event,
        "dtype": embedder.dtype,
        "splits": counts,
        "rejected": len(rejects),
        "provenance": provenance.stamp(
            {
                "model": embedder.spec if isinstance(spec, Embedder) else spec,
                "params": params,
                "task": task.name,
                "dtype": embedder.dtype,
            },
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
        "--spec",
        required=True,
        help='the model: a spec string (random:tiny:0, logmel, a path …) or JSON {"spec": ..., "layer": ...}',
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
        spec = args.spec
        if spec.lstrip().startswith("{"):
            spec = json.loads(spec)
        if args.layer is not None:
            spec = {"spec": parse_spec(spec)[0], "layer": args.layer}
        run(
            args.task, args.model, spec, json.loads(args.params), args.out, args.threads, args.dtype
        )


if __name__ == "__main__":
    main()
