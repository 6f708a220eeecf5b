# Helpers of the stage files. What the config means (sources and their chunks, evaluation tasks,
# models, the training job, the targets, every cross-key check) is the plan's, a pure function
# of the config (pipeline/plan.py, tests/common/test_plan.py); here: its two calls, and thin
# path and param helpers.
import functools
import os

from dasheng_pipeline import plan
from dasheng_pipeline.common import provenance
from dasheng_pipeline.sources import chunking

# Jobs run `python -m dasheng_pipeline...` from this checkout, in whatever environment runs them
# (the project's .venv, or the conda envs of --sdm conda). workflow/lib holds the import names of
# the checkout's model/ and pipeline/ folders (links), as the installed package has them.
# (Snakemake formats the prefix too, hence the doubled braces.)
JOB_PYTHONPATH = os.path.join(workflow.basedir, "workflow", "lib")
shell.prefix('export PYTHONPATH="%s${{PYTHONPATH:+:$PYTHONPATH}}"; ' % JOB_PYTHONPATH)

OUT = config["out_dir"]
LOGS = f"{OUT}/logs"
EVAL = config["evaluation"]
EVAL_OUT = f"{OUT}/eval"
EVAL_LOGS = f"{LOGS}/eval"
PLAN = plan.resolve(config, remote_exec=workflow.remote_exec)
SOURCES = PLAN.sources
TASKS = PLAN.tasks
TRAINING = PLAN.training


def produced_by_a_rule(path):
    """Whether a rule defined so far writes ``path``."""
    return any(str(o) == path for r in workflow.rules for o in r.output)


@functools.cache
def evaluation():
    """The plan's models and targets. Asked only by input and param functions, that is once
    Snakemake builds the DAG and every rule is defined."""
    return plan.resolve_evaluation(PLAN, produced_by_a_rule)


def constraint(names):
    """Wildcard regex matching exactly these names (never matching when empty)."""
    return "|".join(names) if names else "(?!x)x"


def as_json(obj):
    return provenance.canonical_json(obj)


def seed_json(**extra):
    return as_json({"seed": config["seed"], **extra})


# ---- stage 1, audio (sources.smk)


def names_of(kind):
    return [name for name, src in SOURCES.items() if src.type == kind]


def source_params(name, **extra):
    """Params of a source's jobs: its own config, the audio rules, the seed (and for a route
    of a corpus, where its corpus's IDs and the earlier routes' key tables are)."""
    route = route_params(name)
    return seed_json(
        source=name,
        source_cfg=SOURCES[name].cfg,
        audio=config["audio"],
        allow_outside_paths=config["allow_outside_paths"],
        **({"route": route} if route else {}),
        **extra,
    )


MIRRORS = chunking.MIRROR_TYPES
CORPORA = config["corpora"]


def names_in(kinds):
    return [name for name, src in SOURCES.items() if src.type in kinds]


def corpus_ids(corpus):
    return f"{OUT}/corpora/{corpus}/ids.parquet"


def source_keys(name):
    return f"{OUT}/keys/{name}.parquet"


def route_params(name):
    """A route's corpus, its ID table and the key tables of the routes before it (or None)."""
    route = SOURCES[name].route
    if route is None:
        return None
    return {
        "corpus": route.corpus,
        "ids": corpus_ids(route.corpus),
        "earlier": [source_keys(n) for n in route.earlier],
    }


def route_inputs(wildcards):
    """A chunk's route inputs: its corpus's ID table (a mirror rejects what the list lacks) and
    the key tables of the earlier routes (what they obtained)."""
    route = route_params(wildcards.source)
    if route is None:
        return []
    ids = [route["ids"]] if SOURCES[wildcards.source].type in MIRRORS else []
    return ids + route["earlier"]


def mirror_units(wildcards):
    return list(SOURCES[wildcards.source].units[int(wildcards.chunk)])


def mirror_inputs(wildcards):
    """A mirror chunk's local files (a rule may make them) and its route inputs."""
    src = SOURCES[wildcards.source].cfg
    return chunking.local_inputs(src, mirror_units(wildcards)) + route_inputs(wildcards)


def mirror_params(wildcards):
    return source_params(wildcards.source, files=mirror_units(wildcards))


def keyed_sources():
    """Sources with a key table: every mirror (its duplicates across chunks) and every route a
    later route builds on."""
    earlier = {n for s in SOURCES.values() if s.route for n in s.route.earlier}
    return [n for n, s in SOURCES.items() if s.type in MIRRORS or n in earlier]


def keys_inputs(wildcards):
    """A source's chunk manifests (its key table reads them)."""
    return [
        f"{OUT}/manifests/{wildcards.source}/{c}.json"
        for c in SOURCES[wildcards.source].chunks
    ]


def demo_mirrors():
    """Demo sources that write a mirror of themselves (mirror_share above 0)."""
    return [
        n for n, s in SOURCES.items() if s.type == "demo" and s.cfg["mirror_share"] > 0
    ]


def coverage_layout():
    """What the coverage report reads: every source's manifests (a mirror's with its key
    table), every corpus's ID table and routes."""
    return {
        "sources": {
            n: {
                "manifests": [f"{OUT}/manifests/{n}/{c}.json" for c in s.chunks],
                "keys": source_keys(n) if s.type in MIRRORS else None,
            }
            for n, s in SOURCES.items()
        },
        "corpora": {
            c: {"ids": corpus_ids(c), "routes": list(spec["routes"])}
            for c, spec in CORPORA.items()
        },
        "seed": config["seed"],
    }


def all_fetch_manifests():
    return [
        f"{OUT}/manifests/{n}/{c}.json" for n, s in SOURCES.items() for c in s.chunks
    ]


# ---- stage 2, features (features.smk)


def fetch_manifest(wildcards):
    return f"{OUT}/manifests/{wildcards.source}/{wildcards.chunk}.json"


def mel_inputs(wildcards):
    """A mel job's chunk manifest, and for a mirror its source's key table (the mel job rejects
    a key already obtained in an earlier chunk)."""
    mirror = SOURCES[wildcards.source].type in MIRRORS
    return {
        "manifest": fetch_manifest(wildcards),
        "table": [source_keys(wildcards.source)] if mirror else [],
    }


def all_shards(kind):
    """Every chunk's shard folder (kind "dir") or shard manifest (kind "json")."""
    suffix = "" if kind == "dir" else f".{kind}"
    return [
        f"{OUT}/shards/{n}/{c}{suffix}" for n, s in SOURCES.items() for c in s.chunks
    ]


def features_params():
    """Params of the mel step: everything that defines the shards' bytes."""
    return seed_json(mel=config["mel"], audio=config["audio"], shards=config["shards"])


# ---- stage 4, evaluation (evaluate.smk); stage 3 (training.smk) reads TRAINING


EVAL_MODEL_NAMES = constraint(list(config["models"]))


def task_names(**where):
    """Names of the tasks whose attributes have these values (e.g. format="xares")."""
    return [
        n for n, t in TASKS.items() if all(getattr(t, k) == v for k, v in where.items())
    ]


def eval_task_dir(wildcards):
    return TASKS[wildcards.task].dir


def eval_xares_source(wildcards):
    return TASKS[wildcards.task].source


def eval_xares_task_spec(wildcards):
    return as_json(TASKS[wildcards.task].xares)


def eval_weights(wildcards):
    return evaluation().weights[wildcards.model]


def eval_model_spec(wildcards):
    return as_json(evaluation().specs[wildcards.model])


def eval_results_params(wildcards=None):
    keys = ("domain", "paper_name", "xares_name")
    tasks = {n: {k: getattr(t, k) for k in keys} for n, t in TASKS.items()}
    return seed_json(models=list(evaluation().models), tasks=tasks)


def planned(name):
    """Input function: a file list of the plan's evaluation part (result_files, layer_files,
    targets, provenance_artifacts)."""
    return lambda wildcards=None: list(getattr(evaluation(), name))
