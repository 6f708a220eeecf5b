"""Score one encoder on one HEAR task folder: ``dasheng-pipeline evaluate`` and :func:`evaluate_task`.

The same three steps, with the same functions and parameters, as the DAG's ``embed``, ``probe`` and
``knn`` rules, so a task gives the same numbers here as in ``snakemake all``. Writes in ``out``:
``embeddings/`` (per split, as the DAG's), ``probe.json``, ``knn.json``. The probe and k-NN settings
are HEAR's protocol and the paper's k-NN by default; ``config`` (a workflow config file such as
``config/config.yaml``) takes ``seed`` and ``evaluation.{probe,knn,batch_size}`` from it instead.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import yaml

from model import pretrained
from pipeline.common import atomic
from pipeline.evaluation import embeddings, knn, probe

log = logging.getLogger(__name__)


def model_spec(model: str) -> dict:
    """A ``--model`` string → the DAG's ``models:`` entry for it."""
    if model.startswith(pretrained.RANDOM_PREFIX):
        size, seed = pretrained.parse_random(model)
        return {"type": "random", "size": size, "seed": seed}
    return {"type": "checkpoint", "path": model}


def settings_from_config(path: str | os.PathLike | None) -> dict:
    """``seed`` and the evaluation keys a workflow config sets (the rest: the schema's defaults)."""
    if path is None:
        return {"seed": 0, "probe": {}, "knn": {}, "batch_size": 16}
    with open(path, encoding="utf-8") as fh:
        config = yaml.safe_load(fh) or {}
    evaluation = config.get("evaluation") or {}
    return {"seed": int(config.get("seed", 0)), "probe": evaluation.get("probe") or {},
            "knn": evaluation.get("knn") or {}, "batch_size": int(evaluation.get("batch_size", 16))}


def evaluate_task(task_dir: str | os.PathLike, model: str, out: str | os.PathLike, *, run_probe: bool = True,
                  run_knn: bool = True, config: str | os.PathLike | None = None, name: str = "model",
                  threads: int = 1) -> dict:
    """Embeddings, probe and k-NN of ``model`` on the HEAR task at ``task_dir``; returns
    ``{"probe": result, "knn": result}`` (each as the DAG's JSON) for the steps run."""
    out = Path(out)
    settings = settings_from_config(config)
    seed = settings["seed"]
    emb_dir = out / "embeddings"
    params = {"seed": seed, "batch_size": settings["batch_size"], "frames": "events", "decode_threads": 2}
    embeddings.run(task_dir, name, model_spec(model), params, emb_dir, threads)
    results = {}
    if run_probe:
        section = {"seed": seed, "probe": settings["probe"]}
        results["probe"] = probe.run(task_dir, emb_dir, probe.ProbeConfig.from_dict(settings["probe"]), seed,
                                     threads, section)
        atomic.write_json(out / "probe.json", results["probe"])
    if run_knn:
        k = settings["knn"]
        section = {"seed": seed, "knn": settings["knn"]}
        results["knn"] = knn.run(task_dir, emb_dir, int(k.get("k", 10)), bool(k.get("use_valid", True)), seed, section)
        atomic.write_json(out / "knn.json", results["knn"])
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
        lines.append(f"{method}: {r['task']} {metric} {m['mean']:.4f} ± {m['std']:.4f} over {len(m['folds'])} splits")
    return "\n".join(lines)
