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
# With numerics: portable every job also caps its CPU kernels (plan.job_environment).
JOB_PYTHONPATH = os.path.join(workflow.basedir, "workflow", "lib")
JOB_ENV = "".join(f"export {k}={v}; " for k, v in plan.job_environment(config).items())
shell.prefix(
    'export PYTHONPATH="%s${{PYTHONPATH:+:$PYTHONPATH}}"; %s'
    % (JOB_PYTHONPATH, JOB_ENV)
)

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
    return as_json({"seed": config["seed"], **plan.numerics_params(config), **extra})


# ---- stages 1 and 2, audio and features (sources.smk, features.smk): paths and each job's
# inputs are the plan's (plan.DataFiles)

DATA = plan.DataFiles(PLAN)
MIRRORS = chunking.MIRROR_TYPES
CORPORA = config["corpora"]


def source_params(name, **extra):
    """Params of a source's jobs: its own config, the audio rules, the seed (and for a route
    of a corpus, where its corpus's IDs and the earlier routes' key tables are)."""
    route = DATA.route(name)
    return seed_json(
        source=name,
        source_cfg=SOURCES[name].cfg,
        audio=config["audio"],
        allow_outside_paths=config["allow_outside_paths"],
        **({"route": route} if route else {}),
        **extra,
    )


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
