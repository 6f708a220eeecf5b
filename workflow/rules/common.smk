# Helpers of the stage files, stage by stage (paths, chunk lists known at config time, job
# parameters). Everything a helper needs is defined here, above it: no include order to respect
# (only produced_by_a_rule() looks at the rules defined so far, when it is called).
import json
import os
import re

from dasheng_pipeline.common import provenance
from dasheng_pipeline.sources import chunking, lists, local

# Jobs run `python -m dasheng_pipeline...` from this checkout, in whatever environment runs them
# (the project's .venv, or the conda envs of --sdm conda). workflow/lib holds the import names of
# the checkout's model/ and pipeline/ folders (links), as the installed package has them.
# (Snakemake formats the prefix too, hence the doubled braces.)
JOB_PYTHONPATH = os.path.join(workflow.basedir, "workflow", "lib")
shell.prefix('export PYTHONPATH="%s${{PYTHONPATH:+:$PYTHONPATH}}"; ' % JOB_PYTHONPATH)

OUT = config["out_dir"]
LOGS = f"{OUT}/logs"


def constraint(names):
    """Wildcard regex matching exactly these names (never matching when empty)."""
    return "|".join(names) if names else "(?!x)x"


def check_inside(key, path):
    """With allow_outside_paths: false, refuse paths (inputs and out_dir) outside the working directory."""
    if config["allow_outside_paths"]:
        return
    real, here = os.path.realpath(path), os.path.realpath(".")
    if os.path.commonpath([real, here]) != here:
        raise ValueError(
            f"config key {key}: {path!r} lies outside the working directory and "
            "allow_outside_paths is false; move it inside or set allow_outside_paths: true"
        )


check_inside("out_dir", OUT)


def as_json(obj):
    return provenance.canonical_json(obj)


def produced_by_a_rule(path):
    """Whether a rule defined so far writes ``path``."""
    return any(str(o) == path for r in workflow.rules for o in r.output)


# ---- stage 1, audio (sources.smk)


SOURCES = config["sources"]
CORPORA = config["corpora"]
LOCAL_FILES = {}  # local source name -> files in its tree (a param of its index job)
MIRROR_UNITS = {}  # mirror source name -> its chunks' units (files, shards, archives)
MIRRORS = chunking.MIRROR_TYPES


def names_of(kind):
    return [name for name, src in SOURCES.items() if src["type"] == kind]


def _mirror_chunks(name, src):
    for key in ("path", "checksums"):
        if src.get(key):
            check_inside(f"sources.{name}.{key}", src[key])
    MIRROR_UNITS[name] = chunking.chunks_of(
        src, chunking.units(name, src, f"{OUT}/lists")
    )
    for unit in [u for units in MIRROR_UNITS[name] for u in units]:
        if src["type"] == "webdataset" and "://" not in unit:
            check_inside(f"sources.{name}.urls", unit)
    return len(MIRROR_UNITS[name])


def _count_chunks(name, src):
    if src["type"] in MIRRORS:
        return _mirror_chunks(name, src)
    if src["type"] == "demo":
        return lists.n_chunks(src["clips"], src["chunk_size"])
    if src["type"] == "youtube":
        check_inside(f"sources.{name}.list", src["list"])
        if src["cookies"]:
            check_inside(f"sources.{name}.cookies", src["cookies"])
        if not os.path.isfile(src["list"]):
            raise FileNotFoundError(
                f"config key sources.{name}.list: segment list {src['list']!r} not found"
            )
        return lists.n_chunks(lists.count_rows(src["list"]), src["chunk_size"])
    check_inside(f"sources.{name}.root", src["root"])
    if src["labels"] == "csv" and not src["labels_csv"]:
        raise ValueError(
            f"config key sources.{name}.labels_csv: required when labels is 'csv'"
        )
    if src["labels_csv"]:
        check_inside(f"sources.{name}.labels_csv", src["labels_csv"])
    files, _ = local.list_files(src["root"], src["extensions"])
    LOCAL_FILES[name] = len(files)  # a change of the tree re-runs the index
    return lists.n_chunks(len(files), src["chunk_size"])


CHUNKS = {
    name: [f"{i:05d}" for i in range(_count_chunks(name, src))]
    for name, src in SOURCES.items()
}


for _corpus, _spec in CORPORA.items():
    check_inside(f"corpora.{_corpus}.list", _spec["list"])
ROUTES = chunking.routes(CORPORA, SOURCES)


def names_in(kinds):
    return [name for name, src in SOURCES.items() if src["type"] in kinds]


def corpus_ids(corpus):
    return f"{OUT}/corpora/{corpus}/ids.parquet"


def source_keys(name):
    return f"{OUT}/keys/{name}.parquet"


def route_params(name):
    """A route's params: its corpus, the corpus's ID table, the key tables of earlier routes."""
    route = ROUTES.get(name)
    if route is None:
        return None
    return {
        "corpus": route.corpus,
        "ids": corpus_ids(route.corpus),
        "earlier": [source_keys(n) for n in route.earlier],
    }


def route_inputs(wildcards):
    """A chunk's route inputs: the corpus's ID table (mirrors reject unlisted items) and the
    key tables of the earlier routes (what is already obtained)."""
    route = route_params(wildcards.source)
    if route is None:
        return []
    ids = [route["ids"]] if SOURCES[wildcards.source]["type"] in MIRRORS else []
    return ids + route["earlier"]


def mirror_inputs(wildcards):
    src = SOURCES[wildcards.source]
    units = MIRROR_UNITS[wildcards.source][int(wildcards.chunk)]
    return chunking.local_inputs(src, units) + route_inputs(wildcards)


def mirror_params(wildcards):
    units = MIRROR_UNITS[wildcards.source][int(wildcards.chunk)]
    return source_params(wildcards.source, files=units)


def keyed_sources():
    """Sources with a key table: every mirror (duplicates across chunks), every earlier route."""
    earlier = {n for r in ROUTES.values() for n in r.earlier}
    return [n for n in SOURCES if SOURCES[n]["type"] in MIRRORS or n in earlier]


def keys_inputs(wildcards):
    """A source's chunk manifests (its key table reads them)."""
    return [
        f"{OUT}/manifests/{wildcards.source}/{c}.json" for c in CHUNKS[wildcards.source]
    ]


def mel_inputs(wildcards):
    """A mel job's chunk manifest, and for a mirror its source's key table (later copies of a
    key are rejected)."""
    mirror = SOURCES[wildcards.source]["type"] in MIRRORS
    return {
        "manifest": fetch_manifest(wildcards),
        "table": [source_keys(wildcards.source)] if mirror else [],
    }


def coverage_layout():
    """What the coverage report reads: every source's final manifests, every corpus's IDs."""
    return {
        "sources": {
            n: {
                "manifests": [f"{OUT}/manifests/{n}/{c}.json" for c in CHUNKS[n]],
                "keys": source_keys(n) if SOURCES[n]["type"] in MIRRORS else None,
            }
            for n in SOURCES
        },
        "corpora": {
            c: {"ids": corpus_ids(c), "routes": list(spec["routes"])}
            for c, spec in CORPORA.items()
        },
        "seed": config["seed"],
    }


def coverage_targets():
    return [f"{OUT}/data/coverage.csv", f"{OUT}/data/coverage.png"]


def demo_mirrors():
    """Demo sources that write a mirror of themselves (mirror_share above 0)."""
    return [
        n for n, s in SOURCES.items() if s["type"] == "demo" and s["mirror_share"] > 0
    ]


def source_params(name, **extra):
    """Params of a source's jobs: its own config, the audio rules, the seed."""
    return as_json(
        {
            "source": name,
            "source_cfg": SOURCES[name],
            "audio": config["audio"],
            "seed": config["seed"],
            "allow_outside_paths": config["allow_outside_paths"],
            **({"route": route_params(name)} if name in ROUTES else {}),
            **extra,
        }
    )


def all_fetch_manifests():
    return [
        f"{OUT}/manifests/{name}/{chunk}.json"
        for name in SOURCES
        for chunk in CHUNKS[name]
    ]


# ---- stage 2, features (features.smk)


def fetch_manifest(wildcards):
    return f"{OUT}/manifests/{wildcards.source}/{wildcards.chunk}.json"


def all_shards(kind):
    """Every chunk's shard folder (kind "dir") or shard manifest (kind "json")."""
    suffix = "" if kind == "dir" else f".{kind}"
    return [
        f"{OUT}/shards/{name}/{chunk}{suffix}"
        for name in SOURCES
        for chunk in CHUNKS[name]
    ]


def features_params():
    """Params of the mel step: everything that defines the shards' bytes."""
    return as_json(
        {
            "mel": config["mel"],
            "audio": config["audio"],
            "shards": config["shards"],
            "seed": config["seed"],
        }
    )


# ---- stage 3, training (training.smk)


def training_downstream_sets():
    """Quick sets (evaluation stage) of the downstream checks during training, or none."""
    d = config["training"]["downstream"]
    if not d["every_epochs"]:
        return []
    if not d["tasks"]:
        raise ValueError(
            "config key training.downstream.tasks: name the tasks of the downstream checks, "
            "or set training.downstream.every_epochs: 0"
        )
    tasks = _eval_tasks() if config["evaluation"]["enabled"] else {}
    unknown = [t for t in d["tasks"] if t not in tasks]
    if unknown:
        raise ValueError(
            f"config key training.downstream.tasks: {unknown} are not evaluation tasks "
            f"(known: {sorted(tasks)})"
        )
    return [f"{OUT}/eval/quick/{t}.npz" for t in d["tasks"]]


def training_params():
    """Params of the training job: the training section (with the quick sets of its downstream
    checks) and the seed."""
    sets = training_downstream_sets()
    return as_json(
        {
            "training": config["training"]
            | ({"downstream_sets": sets} if sets else {}),
            "seed": config["seed"],
        }
    )


def training_threads():
    """CPUs of the training job per node."""
    t = config["training"]
    per_node = -(-t["workers"] // t["nodes"])  # workers on each node
    return per_node * t["cpus_per_worker"]


def training_gres():
    gpus = config["training"]["gpus_per_node"] if config["training"]["use_gpu"] else 0
    return f"gpu:{gpus}" if gpus else ""


def training_retries():
    """Resubmissions of the training job: as many as the total budget holds per-job slots, minus
    the first (each job resumes from the last step checkpoint). Inside a cluster job (Snakemake's
    remote mode) none: the rule's retries would otherwise apply there too, and a stopped training
    would restart at once in the same job, to be killed at its time limit (the SLURM chain test
    caught this: a second run per job, killed mid-step, its processes outliving the job).
    """
    if workflow.remote_exec:
        return 0
    t = config["training"]
    return max(0, -(-t["total_runtime_min"] // t["runtime_min"]) - 1)


def training_slurm_extra():
    """sbatch --signal for the warning before the time limit. SIGURG: every process of the job
    step gets it and ignores it by default (snakemake, bash, Ray); the training driver handles it.
    """
    lead = config["training"]["signal_lead_s"]
    return f"'--signal=URG@{lead}'" if lead else ""


# ---- stage 4, evaluation (evaluate.smk)

EVAL = config["evaluation"]
EVAL_OUT = f"{OUT}/eval"
EVAL_LOGS = f"{LOGS}/eval"
TRAINED_DEFAULT = f"{OUT}/training/encoder.safetensors"


def _eval_demo_task_names():
    from dasheng_pipeline.evaluation import demo_tasks as _demo_tasks

    demo = EVAL["demo_tasks"]
    speech = demo["speech"]
    wanted = list(demo["tasks"])
    extra = [
        t
        for t in _demo_tasks.available(
            "true" if speech is True else "false" if speech is False else "auto"
        )
        if t in _demo_tasks.SPEECH
    ]
    return wanted + [t for t in extra if t not in wanted]


def _eval_demo_xares_names():
    """Demo tasks that run (HEAR format) and are also packed as X-ARES tasks (demo_tasks.xares)."""
    from dasheng_pipeline.evaluation import demo_tasks as _demo_tasks

    hear = set(_eval_demo_task_names())
    return [
        t + _demo_tasks.XARES_SUFFIX for t in EVAL["demo_tasks"]["xares"] if t in hear
    ]


def _eval_xares_spec(name, spec):
    """An X-ARES task's reader config (the keys dasheng_pipeline.evaluation.xares_tasks reads)."""
    keys = ("path", "label", "kind", "splits", "folds", "split_pattern", "fold_pattern")
    keys += ("labels", "label_sep", "weight", "xares_name", "domain", "mlp")
    out = {k: spec.get(k) for k in keys if k in spec}
    if not out.get("splits") and not out.get("folds"):
        raise ValueError(
            f"config key evaluation.tasks.{name}: an X-ARES task needs 'splits' or 'folds'"
        )
    return out


def _eval_protocols(fmt, protocols):
    if protocols:
        return list(protocols)
    return ["xares_mlp", "xares_knn"] if fmt == "xares" else ["probe", "knn"]


def _eval_tasks():
    """Task name → {"dir", "demo", "format", "source", "xares", "protocols", "domain", "paper_name",
    "xares_name"}; an X-ARES task's "dir" is its converted HEAR folder, "source" its shards.
    """
    from dasheng_pipeline.evaluation import demo_tasks as _demo_tasks

    tasks = {}
    for name in _eval_demo_task_names():
        tasks[name] = {
            "dir": f"{EVAL_OUT}/tasks/{name}",
            "demo": True,
            "format": "hear",
            "protocols": _eval_protocols("hear", None),
            "domain": None,
            "paper_name": None,
            "xares_name": None,
        }
    for name in _eval_demo_xares_names():
        source = f"{EVAL_OUT}/xares_sources/{name}"
        demo = name[: -len(_demo_tasks.XARES_SUFFIX)]
        tasks[name] = {
            "dir": f"{EVAL_OUT}/tasks/{name}",
            "demo": False,
            "format": "xares",
            "source": source,
            "xares": _demo_tasks.xares_config(demo, source),
            "protocols": _eval_protocols("xares", None),
            "domain": None,
            "paper_name": None,
            "xares_name": None,
        }
    for name, spec in EVAL["tasks"].items():
        if name in tasks:
            raise ValueError(
                f"config key evaluation.tasks.{name}: the name is taken by a demo task; rename it"
            )
        check_inside(f"evaluation.tasks.{name}.path", spec["path"])
        fmt = spec["format"]
        tasks[name] = {
            "dir": spec["path"] if fmt == "hear" else f"{EVAL_OUT}/tasks/{name}",
            "demo": False,
            "format": fmt,
            "protocols": _eval_protocols(fmt, spec["protocols"]),
            "domain": spec["domain"],
            "paper_name": spec["paper_name"],
            "xares_name": spec["xares_name"],
        }
        if fmt == "xares":
            tasks[name]["source"] = spec["path"]
            tasks[name]["xares"] = _eval_xares_spec(name, spec)
    return tasks


def _model_spec(name):
    """The model's config with defaults resolved (paths, the random encoder's size and seed)."""
    spec = {k: v for k, v in config["models"][name].items() if k != "enabled"}
    if spec.get("path") and (
        (spec["type"] == "checkpoint" and not _is_hub_id(spec["path"]))
        or os.path.exists(spec["path"])
    ):
        check_inside(f"models.{name}.path", spec["path"])
    if spec["type"] == "checkpoint" and not spec.get("path"):
        if name != "trained":
            raise ValueError(
                f"config key models.{name}.path: a checkpoint model needs a path"
            )
        spec["path"] = TRAINED_DEFAULT
    if spec["type"] == "random":
        spec["size"] = spec.get("size") or config.get("training", {}).get(
            "size", "base"
        )
        spec["seed"] = config["seed"] if spec.get("seed") is None else spec["seed"]
    if spec["type"] == "hear_module" and not spec.get("module"):
        raise ValueError(
            f"config key models.{name}.module: a hear_module model needs a module name"
        )
    return spec


def eval_models():
    """Names of the models to evaluate (``enabled: auto``: the weights exist or a rule makes them)."""
    if not EVAL["enabled"]:
        return []
    names = []
    for name, m in config["models"].items():
        enabled = m["enabled"]
        if enabled == "auto":
            path = _model_spec(name).get("path")
            enabled = not path or os.path.exists(path) or produced_by_a_rule(path)
        if enabled:
            names.append(name)
    return names


def eval_task_dir(wildcards):
    return EVAL_TASKS[wildcards.task]["dir"]


def eval_weights(wildcards):
    """The model's weights file, so that Snakemake (re)builds embeddings when it changes: a
    checkpoint file, a Hugging Face folder's model.safetensors, none for a hub repo id (fetched
    by the job) or a HEAR module's path that names no file."""
    spec = _model_spec(wildcards.model)
    path = spec.get("path")
    if not path:
        return []
    if spec["type"] == "checkpoint" and os.path.isdir(path):
        return [os.path.join(path, "model.safetensors")]
    if spec["type"] == "checkpoint" and not _is_hub_id(path):
        return [path]
    return [path] if os.path.isfile(path) else []


def _is_hub_id(path):
    """owner/name that is no local path and no rule's output: a Hugging Face repo id."""
    return (
        re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", path) is not None
        and not path.endswith((".pt", ".safetensors"))
        and not os.path.exists(path)
        and not produced_by_a_rule(path)
    )


def eval_embed_params(wildcards):
    return as_json(
        {
            "seed": config["seed"],
            "batch_size": EVAL["batch_size"],
            "frames": EVAL["frames"],
            "decode_threads": EVAL["decode_threads"],
        }
    )


def eval_probe_params():
    return as_json({"seed": config["seed"], "probe": EVAL["probe"]})


def eval_knn_params():
    return as_json({"seed": config["seed"], "knn": EVAL["knn"]})


def eval_xares_params():
    return as_json({"seed": config["seed"], "xares": EVAL["xares"]})


def eval_xares_source(wildcards):
    return EVAL_TASKS[wildcards.task]["source"]


def eval_xares_task_spec(wildcards):
    return as_json(EVAL_TASKS[wildcards.task]["xares"])


def _eval_xares_tasks(demo=None):
    """Names of the X-ARES-format tasks (demo=True: only the generated ones)."""
    return [
        n
        for n, t in EVAL_TASKS.items()
        if t["format"] == "xares"
        and (
            demo is None or t["source"].startswith(f"{EVAL_OUT}/xares_sources/") == demo
        )
    ]


def eval_results_params(wildcards=None):
    return as_json(
        {
            "seed": config["seed"],
            "models": eval_models(),
            "tasks": {
                n: {
                    "domain": t["domain"],
                    "paper_name": t["paper_name"],
                    "xares_name": t["xares_name"],
                }
                for n, t in EVAL_TASKS.items()
            },
        }
    )


def _eval_runs(task):
    """The protocols a task runs (HEAR's k-NN also follows knn.enabled and knn.exclude)."""
    runs = EVAL_TASKS[task]["protocols"]
    if task in EVAL["knn"]["exclude"] or not EVAL["knn"]["enabled"]:
        runs = [p for p in runs if p != "knn"]
    return runs


def eval_result_files(wildcards=None):
    models = eval_models()
    return [
        f"{EVAL_OUT}/{p}/{m}/{t}.json"
        for t in EVAL_TASKS
        for p in _eval_runs(t)
        for m in models
    ]


def eval_quick_params():
    return as_json({"seed": config["seed"]} | EVAL["quick_sets"])


def eval_layer_files(wildcards=None):
    """Layer-wise score JSONs: every evaluated model on every task of evaluation.layers."""
    unknown = [t for t in EVAL["layers"]["tasks"] if t not in EVAL_TASKS]
    if unknown:
        raise ValueError(
            f"config key evaluation.layers.tasks: {unknown} are not evaluation tasks "
            f"(known: {sorted(EVAL_TASKS)})"
        )
    return [
        f"{EVAL_OUT}/layers/{m}/{t}.json"
        for m in eval_models()
        for t in EVAL["layers"]["tasks"]
    ]


def eval_downstream_csv():
    """The training stage's downstream checks, when it makes them."""
    if config["training"]["downstream"]["every_epochs"] and "trained" in eval_models():
        return f"{OUT}/training/downstream.csv"
    return None


def eval_training_metrics():
    if EVAL["training_metrics"]:
        check_inside("evaluation.training_metrics", EVAL["training_metrics"])
    return EVAL["training_metrics"] or f"{OUT}/training/metrics.csv"


def evaluation_targets(wildcards=None):
    if not EVAL["enabled"] or not EVAL_TASKS or not eval_models():
        return []
    targets = [
        f"{EVAL_OUT}/results/scores.csv",
        f"{EVAL_OUT}/results/comparison.csv",
        f"{EVAL_OUT}/plots/domains.png",
        f"{EVAL_OUT}/plots/tasks.png",
    ]
    if eval_layer_files():
        targets.append(f"{EVAL_OUT}/plots/layers.png")
    if eval_downstream_csv() and produced_by_a_rule(eval_downstream_csv()):
        targets.append(f"{EVAL_OUT}/plots/downstream.png")
    # The loss curve: when the metrics exist, or when the run trains a model it evaluates
    # (never a training run just to draw its curve).
    metrics_csv = eval_training_metrics()
    trains = any(
        produced_by_a_rule(_model_spec(m).get("path") or "") for m in eval_models()
    )
    if os.path.exists(metrics_csv) or (trains and produced_by_a_rule(metrics_csv)):
        targets.append(f"{EVAL_OUT}/plots/loss_curve.png")
    return targets


EVAL_TASKS = _eval_tasks() if EVAL["enabled"] else {}
EVAL_MODEL_NAMES = constraint(list(config["models"]))


# ---- the report (report.smk)


def provenance_artifacts():
    """The run's main JSON artifacts (each carries a provenance stamp)."""
    files = [f"{OUT}/dataset/manifest.json", f"{OUT}/training/summary.json"]
    if EVAL["enabled"] and evaluation_targets():
        files.append(f"{EVAL_OUT}/results/summary.json")
    return files
