"""Score one encoder on one task: ``dasheng-pipeline evaluate`` and :func:`evaluate_task`.

The same steps, with the same functions and parameters, as the DAG's ``embed``, ``probe``, ``knn``
and ``xares_protocol`` rules, so a task gives the same numbers here as in ``snakemake all``.

- A HEAR task folder (``task_metadata.json``): protocols ``probe`` (HEAR's MLP) and ``knn`` (the
  paper's) by default.
- An X-ARES task folder (webdataset ``.tar`` shards): its reader settings (label field, splits or
  folds, kind) come from the ``evaluation.tasks`` entry of ``config`` whose name or path matches the
  folder (``config/xares.yaml`` lists X-ARES's public tasks); protocols ``xares_mlp`` and
  ``xares_knn`` by default. The shards are converted once into ``out/task``.

Writes in ``out``: ``embeddings/`` (per split, as the DAG's) and ``<protocol>.json`` per protocol.
The settings are the schema's defaults (HEAR's protocol, the paper's k-NN, X-ARES's MLP and k-NN);
``config`` (a workflow config file such as ``config/config.yaml``) takes ``seed`` and
``evaluation.{probe,knn,xares,batch_size}`` from it instead.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import yaml

from dasheng_model import pretrained
from dasheng_pipeline.common import atomic
from dasheng_pipeline.evaluation import embeddings, knn, probe

log = logging.getLogger(__name__)


def model_spec(model: str) -> dict:
    """A ``--model`` string → the DAG's ``models:`` entry for it (``logmel``: the log-mel baseline)."""
    if model == "logmel":
        return {"type": "logmel"}
    if model.startswith(pretrained.RANDOM_PREFIX):
        size, seed = pretrained.parse_random(model)
        return {"type": "random", "size": size, "seed": seed}
    return {"type": "checkpoint", "path": model}


PROTOCOLS = ("probe", "knn", "xares_mlp", "xares_knn")


def _read_config(path: str | os.PathLike | None) -> dict:
    if path is None:
        return {}
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh) or {}


def settings_from_config(path: str | os.PathLike | None) -> dict:
    """``seed`` and the evaluation keys a workflow config sets (the rest: the schema's defaults)."""
    config = _read_config(path)
    evaluation = config.get("evaluation") or {}
    return {
        "seed": int(config.get("seed", 0)),
        "probe": evaluation.get("probe") or {},
        "knn": evaluation.get("knn") or {},
        "xares": evaluation.get("xares") or {},
        "batch_size": int(evaluation.get("batch_size", 16)),
    }


def xares_entry(task_dir: Path, config: str | os.PathLike | None) -> tuple[str, dict]:
    """The ``evaluation.tasks`` entry (name, settings) of ``config`` that describes ``task_dir``."""
    tasks = (_read_config(config).get("evaluation") or {}).get("tasks") or {}
    for name, entry in tasks.items():
        if entry.get("format") == "xares" and (
            name == task_dir.name
            or (entry.get("path") and os.path.realpath(entry["path"]) == os.path.realpath(task_dir))
        ):
            return name, {**entry, "path": str(task_dir)}
    where = f"in {config}" if config else "(no --config given)"
    raise ValueError(
        f"{task_dir}: an X-ARES task folder (.tar shards), but no evaluation.tasks entry {where} "
        f"names it; pass --config config/xares.yaml (or a config whose task has format: xares, "
        f"path: {task_dir})"
    )


def evaluate_task(
    task_dir: str | os.PathLike,
    model: str,
    out: str | os.PathLike,
    *,
    protocols: list[str] | None = None,
    config: str | os.PathLike | None = None,
    name: str = "model",
    threads: int = 1,
) -> dict:
    """Embeddings of ``model`` on the task at ``task_dir`` and its scores under ``protocols``
    (default: by the task's format); returns ``{protocol: result}``, each as the DAG's JSON."""
    from dasheng_pipeline.evaluation import xares_protocols, xares_tasks

    task_dir, out = Path(task_dir), Path(out)
    settings = settings_from_config(config)
    seed = settings["seed"]
    is_hear = (task_dir / "task_metadata.json").is_file()
    if not is_hear and not any(task_dir.glob("*.tar")):
        raise ValueError(
            f"{task_dir}: neither a HEAR task folder (task_metadata.json) nor an X-ARES one (.tar shards)"
        )
    protocols = list(protocols or (("probe", "knn") if is_hear else ("xares_mlp", "xares_knn")))
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown:
        raise ValueError(f"unknown protocols {unknown}; expected some of {list(PROTOCOLS)}")
    if not is_hear:  # the shards → a HEAR folder once, as the DAG's xares_task rule does
        task_name, entry = xares_entry(task_dir, config)
        task_dir = out / "task"
        if not (task_dir / "task_metadata.json").is_file():
            xares_tasks.convert(xares_tasks.XaresSpec.from_config(task_name, entry), task_dir, seed)
    emb_dir = out / "embeddings"
    params = {
        "seed": seed,
        "batch_size": settings["batch_size"],
        "frames": "events",
        "decode_threads": 2,
    }
    embeddings.run(task_dir, name, model_spec(model), params, emb_dir, threads)
    results = {}
    for protocol in protocols:
        if protocol == "probe":
            results[protocol] = probe.run(
                task_dir,
                emb_dir,
                probe.ProbeConfig.from_dict(settings["probe"]),
                seed,
                threads,
                {"seed": seed, "probe": settings["probe"]},
            )
        elif protocol == "knn":
            k = settings["knn"]
            results[protocol] = knn.run(
                task_dir,
                emb_dir,
                int(k.get("k", 10)),
                bool(k.get("use_valid", True)),
                seed,
                {"seed": seed, "knn": k},
            )
        else:
            x = settings["xares"]
            results[protocol] = xares_protocols.run(
                protocol,
                task_dir,
                emb_dir,
                seed,
                x.get("mlp"),
                x.get("knn"),
                threads,
                {"seed": seed, "xares": x},
            )
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
