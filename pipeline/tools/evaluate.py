"""Score one encoder on one task: ``dasheng-pipeline evaluate`` and :func:`evaluate_task`.

The same steps, with the same functions and parameters, as the DAG's ``embed``, ``probe``, ``knn``
and ``xares_protocol`` rules, so a task gives the same numbers here as in ``snakemake all``.

- A HEAR task folder (``task_metadata.json``): protocols ``probe`` (HEAR's MLP) and ``knn`` (the
  paper's) by default.
- An X-ARES task folder (webdataset ``.tar`` shards): its reader settings (label field, splits or
  folds, kind) come from the ``evaluation.tasks`` entry of ``config`` whose name or path matches the
  folder (``config/xares.yaml`` lists X-ARES's public tasks); protocols ``xares_mlp`` and
  ``xares_knn`` by default. The shards are converted once into ``out/task``.

``model`` is a model spec string, the same as everywhere (``embed --model``, the DAG's ``models:``):
a checkpoint, a Hugging Face folder or repo id, ``random:<size>[:<seed>]``, ``logmel`` or
``hear:<module>[:<path>]``.

Writes in ``out``: ``embeddings/`` (per split, as the DAG's) and ``<protocol>.json`` per protocol,
each naming the model (its spec) and its weights' sha256. An ``out`` that holds another model's
results is refused (pass another ``--out``).
The settings are the workflow's, resolved by the same code (:mod:`dasheng_pipeline.plan`): ``seed``
and ``evaluation.{probe,knn,xares,batch_size,decode_threads}`` of ``config`` (a workflow config
file such as ``config/config.yaml``), the schema's defaults (``config/schema.yaml``: HEAR's
protocol, the paper's k-NN, X-ARES's MLP and k-NN) for what it leaves out or without one.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from dasheng_pipeline import plan
from dasheng_pipeline.common import atomic
from dasheng_pipeline.evaluation import embeddings
from dasheng_pipeline.evaluation.protocols import hear_mlp as probe
from dasheng_pipeline.evaluation.protocols import knn

log = logging.getLogger(__name__)


PROTOCOLS = ("probe", "knn", "xares_mlp", "xares_knn")


def settings_from_config(path: str | os.PathLike | None) -> dict:
    """``seed`` and the evaluation settings of a workflow config (None: the schema's defaults),
    resolved as the workflow resolves them (:func:`dasheng_pipeline.plan.read_config`)."""
    config = plan.read_config(path)
    evaluation = config["evaluation"]
    return {
        "config": config,
        "seed": config["seed"],
        "probe": evaluation["probe"],
        "knn": evaluation["knn"],
        "xares": evaluation["xares"],
        # the DAG's embed params; frame embeddings only for event tasks (scene protocols use
        # clip embeddings, so the scores are the DAG's whatever evaluation.frames says)
        "embed": {
            "seed": config["seed"],
            "batch_size": evaluation["batch_size"],
            "frames": "events",
            "decode_threads": evaluation["decode_threads"],
        },
    }


def xares_entry(task_dir: Path, config: dict, where: str) -> tuple[str, dict]:
    """The X-ARES reader config (name, settings) of the ``evaluation.tasks`` entry of ``config``
    that describes ``task_dir``, as the DAG's xares_task rule gets it."""
    for name, entry in config["evaluation"]["tasks"].items():
        if entry["format"] == "xares" and (
            name == task_dir.name or os.path.realpath(entry["path"]) == os.path.realpath(task_dir)
        ):
            return name, {**plan.xares_spec(name, entry), "path": str(task_dir)}
    raise ValueError(
        f"{task_dir}: an X-ARES task folder (.tar shards), but no evaluation.tasks entry {where} "
        f"names it; pass --config config/xares.yaml (or a config whose task has format: xares, "
        f"path: {task_dir})"
    )


def _hear_folder(task_dir: Path, out: Path, settings: dict, config_path) -> Path:
    """The task's HEAR folder: ``task_dir`` itself, or an X-ARES task's shards converted once
    into ``out/task`` (as the DAG's xares_task rule does)."""
    from dasheng_pipeline.evaluation.tasks import xares as xares_tasks

    if (task_dir / "task_metadata.json").is_file():
        return task_dir
    if not any(task_dir.glob("*.tar")):
        raise ValueError(
            f"{task_dir}: neither a HEAR task folder (task_metadata.json) nor an X-ARES one (.tar shards)"
        )
    where = f"in {config_path}" if config_path else "(no --config given)"
    name, entry = xares_entry(task_dir, settings["config"], where)
    hear_dir = out / "task"
    if not (hear_dir / "task_metadata.json").is_file():
        spec = xares_tasks.XaresSpec.from_config(name, entry)
        xares_tasks.convert(spec, hear_dir, settings["seed"])
    return hear_dir


def _score(protocol: str, task_dir: Path, emb_dir: Path, settings: dict, threads: int) -> dict:
    """One protocol's result, with the DAG's function and params."""
    from dasheng_pipeline.evaluation.protocols import xares as xares_protocols

    seed = settings["seed"]
    if protocol == "probe":
        cfg = probe.ProbeConfig.from_dict(settings["probe"])
        params = {"seed": seed, "probe": settings["probe"]}
        return probe.run(task_dir, emb_dir, cfg, seed, threads, params)
    if protocol == "knn":
        k = settings["knn"]
        return knn.run(task_dir, emb_dir, k["k"], k["use_valid"], seed, {"seed": seed, "knn": k})
    x = settings["xares"]
    params = {"seed": seed, "xares": x}
    return xares_protocols.run(
        protocol, task_dir, emb_dir, seed, x["mlp"], x["knn"], threads, params
    )


def check_out(out: Path, embedder: embeddings.Embedder) -> None:
    """Refuse an ``out`` that holds the results of another model (its embeddings' meta.json or a
    protocol's JSON name other weights)."""
    records = [out / "embeddings" / "meta.json", *(out / f"{p}.json" for p in PROTOCOLS)]
    for path in records:
        if not path.is_file():
            continue
        doc = json.loads(path.read_text(encoding="utf-8"))
        sha = doc.get("model_sha256")
        if sha != embedder.sha256:
            theirs = f"sha256 {sha[:12]}…" if sha else "no sha256 recorded"
            raise ValueError(
                f"{path}: the results of another model ({doc.get('model_spec') or doc.get('model')}, "
                f"{theirs}; this model {embedder.spec}, sha256 {embedder.sha256[:12]}…); "
                "pass another --out, or delete it"
            )


def evaluate_task(
    task_dir: str | os.PathLike,
    model: str,
    out: str | os.PathLike,
    *,
    protocols: list[str] | None = None,
    config: str | os.PathLike | None = None,
    name: str | None = None,
    threads: int = 1,
) -> dict:
    """Embeddings of ``model`` (a model spec string) on the task at ``task_dir`` and its scores
    under ``protocols`` (default: by the task's format); returns ``{protocol: result}``, each as
    the DAG's JSON plus ``model_sha256``. ``name``: the model's name in them (default: its spec)."""
    task_dir, out = Path(task_dir), Path(out)
    settings = settings_from_config(config)
    is_hear = (task_dir / "task_metadata.json").is_file()
    protocols = list(protocols or (("probe", "knn") if is_hear else ("xares_mlp", "xares_knn")))
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown:
        raise ValueError(f"unknown protocols {unknown}; expected some of {list(PROTOCOLS)}")
    embedder = embeddings.build_embedder(model, batch_size=settings["embed"]["batch_size"])
    check_out(out, embedder)
    task_dir = _hear_folder(task_dir, out, settings, config)
    emb_dir = out / "embeddings"
    embeddings.run(task_dir, name or model, embedder, settings["embed"], emb_dir, threads)
    results = {}
    for protocol in protocols:
        result = _score(protocol, task_dir, emb_dir, settings, threads)
        results[protocol] = {**result, "model_spec": model, "model_sha256": embedder.sha256}
        atomic.write_json(out / f"{protocol}.json", results[protocol])
    return results


def headline(results: dict) -> str:
    """One line per method: the primary metric, mean ± std over the task's splits."""
    lines = []
    for method, r in results.items():
        if r.get("skipped"):
            lines.append(f"{method}: skipped ({r['skipped']})")
            continue
        metric = r["primary_metric"]
        m = r["metrics"][metric]
        lines.append(
            f"{method}: {r['task']} {metric} {m['mean']:.4f} ± {m['std']:.4f} over {len(m['folds'])} splits"
        )
    return "\n".join(lines)
