"""The plan of a run: a validated workflow config → what the rule files need to know.

A pure resolver: it reads the config and the file system (segment lists, local trees, whether
weights exist), fills no global, and takes what it needs from Snakemake as arguments. Every
cross-key check lives here and fails with one line naming the config key. Two steps, because
one part asks which paths the workflow's rules write, known only once every rule file is read:

- :func:`resolve` (``workflow/rules/common.smk``, before any rule): sources and their chunks,
  the files of each local source, the evaluation tasks, the quick sets of the quick checks
  during training, the training job's parameters and resources.
- :func:`resolve_evaluation` (while Snakemake builds the DAG): the models' resolved specs and
  weights files, the models evaluated, the result files, the targets of ``evaluate`` and the
  run's provenance artifacts.

``config`` is the dict Snakemake holds after ``validate(config, "config/schema.yaml",
set_default=True)``; outside Snakemake, :func:`read_config` gives the same dict (the schema's
defaults, :mod:`dasheng_pipeline.common.schema`). The plan sits above the stages it reads (the
sources' list and tree readers, the evaluation's demo tasks) and below the tools and the
command line (import-linter's layers in pyproject.toml).

A new source type is one function ``(name, source config, allow_outside_paths) -> Source`` in
:data:`SOURCE_TYPES`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import yaml

from dasheng_model import numerics
from dasheng_pipeline.common import schema
from dasheng_pipeline.evaluation.tasks import demo as demo_tasks
from dasheng_pipeline.sources import chunking, lists, local

# Config keys that were renamed: old dotted key → new one (refused with a one-line error).
RENAMED_KEYS = {"training.downstream": "training.quick_checks"}


def check_renamed_keys(config: dict) -> None:
    """Refuse a config that still uses a renamed key, naming the new key (the workflow runs this
    before the schema's validation, whose message would only say the old key is unexpected)."""
    for old, new in RENAMED_KEYS.items():
        node = config
        *parents, last = old.split(".")
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and last in node:
            raise ValueError(f"config key {old} was renamed to {new}: rename it in the config")


def read_config(path: str | os.PathLike | None) -> dict:
    """A workflow config file (None: an empty one) with the schema's defaults filled in."""
    config = {}
    if path is not None:
        with open(path, encoding="utf-8") as fh:
            config = yaml.safe_load(fh) or {}
    check_renamed_keys(config)
    return schema.with_defaults(config)


def check_inside(key: str, path: str, allow_outside: bool) -> None:
    """With ``allow_outside_paths: false``, refuse paths (inputs and out_dir) outside the working
    directory."""
    if allow_outside:
        return
    real, here = os.path.realpath(path), os.path.realpath(".")
    if os.path.commonpath([real, here]) != here:
        raise ValueError(
            f"config key {key}: {path!r} lies outside the working directory and "
            "allow_outside_paths is false; move it inside or set allow_outside_paths: true"
        )


# ---- stage 1, sources and their chunks


@dataclass(frozen=True)
class Source:
    """A source of audio: its config, its chunks ("00000", ...), for a local source the
    number of audio files in its tree (a parameter of its index job, so that a change of the
    tree re-runs the index), for a mirror each chunk's units (Parquet files, tar shards,
    archives), and for a route of a corpus its place there."""

    name: str
    cfg: dict
    chunks: tuple[str, ...]
    files: int | None = None
    units: tuple[tuple, ...] = ()
    route: chunking.Route | None = None

    @property
    def type(self) -> str:
        return self.cfg["type"]


def chunk_names(rows: int, chunk_size: int) -> tuple[str, ...]:
    return tuple(f"{i:05d}" for i in range(lists.n_chunks(rows, chunk_size)))


def _demo_source(name: str, src: dict, allow_outside: bool) -> Source:
    return Source(name, src, chunk_names(src["clips"], src["chunk_size"]))


def _youtube_source(name: str, src: dict, allow_outside: bool) -> Source:
    check_inside(f"sources.{name}.list", src["list"], allow_outside)
    if src["cookies"]:
        check_inside(f"sources.{name}.cookies", src["cookies"], allow_outside)
    if not os.path.isfile(src["list"]):
        raise FileNotFoundError(
            f"config key sources.{name}.list: segment list {src['list']!r} not found"
        )
    return Source(name, src, chunk_names(lists.count_rows(src["list"]), src["chunk_size"]))


def _local_source(name: str, src: dict, allow_outside: bool) -> Source:
    check_inside(f"sources.{name}.root", src["root"], allow_outside)
    if src["labels"] == "csv" and not src["labels_csv"]:
        raise ValueError(f"config key sources.{name}.labels_csv: required when labels is 'csv'")
    if src["labels_csv"]:
        check_inside(f"sources.{name}.labels_csv", src["labels_csv"], allow_outside)
    if not os.path.isdir(src["root"]):
        raise FileNotFoundError(f"config key sources.{name}.root: {src['root']!r} is not a folder")
    files, _ = local.list_files(src["root"], src["extensions"])
    return Source(name, src, chunk_names(len(files), src["chunk_size"]), files=len(files))


def _mirror_source(name: str, src: dict, units: list) -> Source:
    groups = chunking.chunks_of(src, units)
    return Source(name, src, chunk_names(len(groups), 1), units=tuple(map(tuple, groups)))


def _hf_parquet_source(name: str, src: dict, allow_outside: bool) -> Source:
    if src["path"]:
        check_inside(f"sources.{name}.path", src["path"], allow_outside)
    return _mirror_source(name, src, chunking.units(name, src))


def _webdataset_source(name: str, src: dict, allow_outside: bool) -> Source:
    units = chunking.units(name, src)
    for unit in units:
        if "://" not in unit:
            check_inside(f"sources.{name}.urls", unit, allow_outside)
    return _mirror_source(name, src, units)


def _http_archive_source(name: str, src: dict, allow_outside: bool) -> Source:
    if src["checksums"]:
        check_inside(f"sources.{name}.checksums", src["checksums"], allow_outside)
    return _mirror_source(name, src, chunking.units(name, src))


# Source type → its resolver (the schema's $defs/source lists the same types).
SOURCE_TYPES: dict[str, Callable[[str, dict, bool], Source]] = {
    "demo": _demo_source,
    "youtube": _youtube_source,
    "local": _local_source,
    "hf_parquet": _hf_parquet_source,
    "webdataset": _webdataset_source,
    "http_archive": _http_archive_source,
}


def resolve_sources(config: dict) -> dict[str, Source]:
    """Every source with its chunks; a route of a corpus also with its place there."""
    out = {}
    for name, src in config["sources"].items():
        if src["type"] not in SOURCE_TYPES:
            raise ValueError(
                f"config key sources.{name}.type: {src['type']!r} is not one of {list(SOURCE_TYPES)}"
            )
        out[name] = SOURCE_TYPES[src["type"]](name, src, config["allow_outside_paths"])
    for corpus, spec in config.get("corpora", {}).items():
        check_inside(f"corpora.{corpus}.list", spec["list"], config["allow_outside_paths"])
    routes = chunking.routes(config.get("corpora", {}), config["sources"])
    return {n: replace(s, route=routes.get(n)) for n, s in out.items()}


# ---- stage 4, evaluation tasks


@dataclass(frozen=True)
class Task:
    """An evaluation task. ``dir``: its HEAR folder (an X-ARES task's converted one);
    ``runs``: the protocols it runs (HEAR's k-NN also follows knn.enabled and knn.exclude)."""

    name: str
    dir: str
    format: str  # hear | xares
    runs: tuple[str, ...]
    demo: bool = False  # a demo task, made by the rule demo_task
    packed_demo: bool = False  # a demo task packed as X-ARES shards (rule demo_xares_source)
    source: str | None = None  # X-ARES: the folder of its shards
    xares: dict | None = None  # X-ARES: its reader config (evaluation.tasks.xares)
    domain: str | None = None
    paper_name: str | None = None
    xares_name: str | None = None


XARES_KEYS = ("path", "label", "kind", "splits", "folds", "split_pattern", "fold_pattern")
XARES_KEYS += ("labels", "label_sep", "weight", "xares_name", "domain", "mlp")


def xares_spec(name: str, spec: dict) -> dict:
    """An X-ARES task's reader config (the keys dasheng_pipeline.evaluation.tasks.xares reads)."""
    out = {k: spec.get(k) for k in XARES_KEYS if k in spec}
    if not out.get("splits") and not out.get("folds"):
        raise ValueError(
            f"config key evaluation.tasks.{name}: an X-ARES task needs 'splits' or 'folds'"
        )
    return out


def _runs(config: dict, name: str, fmt: str, protocols) -> tuple[str, ...]:
    runs = list(protocols or (["xares_mlp", "xares_knn"] if fmt == "xares" else ["probe", "knn"]))
    knn = config["evaluation"]["knn"]
    if name in knn["exclude"] or not knn["enabled"]:
        runs = [p for p in runs if p != "knn"]
    return tuple(runs)


def demo_task_names(config: dict) -> list[str]:
    """The demo tasks that run (HEAR format): those named, plus the speech ones when
    ``speech`` is true, or auto and espeak-ng is on PATH."""
    demo = config["evaluation"]["demo_tasks"]
    speech = {True: "true", False: "false"}.get(demo["speech"], "auto")
    extra = [t for t in demo_tasks.available(speech) if t in demo_tasks.SPEECH]
    return list(demo["tasks"]) + [t for t in extra if t not in demo["tasks"]]


def _demo_tasks(config: dict, eval_out: str) -> dict[str, Task]:
    tasks = {}
    names = demo_task_names(config)
    for name in names:
        tasks[name] = Task(
            name, f"{eval_out}/tasks/{name}", "hear", _runs(config, name, "hear", None), demo=True
        )
    for demo in config["evaluation"]["demo_tasks"]["xares"]:
        if demo not in names:
            continue
        name = demo + demo_tasks.XARES_SUFFIX
        source = f"{eval_out}/xares_sources/{name}"
        tasks[name] = Task(
            name,
            f"{eval_out}/tasks/{name}",
            "xares",
            _runs(config, name, "xares", None),
            packed_demo=True,
            source=source,
            xares=demo_tasks.xares_config(demo, source),
        )
    return tasks


def _user_task(config: dict, name: str, spec: dict, eval_out: str) -> Task:
    check_inside(f"evaluation.tasks.{name}.path", spec["path"], config["allow_outside_paths"])
    fmt = spec["format"]
    xares = fmt == "xares"
    return Task(
        name,
        f"{eval_out}/tasks/{name}" if xares else spec["path"],
        fmt,
        _runs(config, name, fmt, spec["protocols"]),
        source=spec["path"] if xares else None,
        xares=xares_spec(name, spec) if xares else None,
        domain=spec["domain"],
        paper_name=spec["paper_name"],
        xares_name=spec["xares_name"],
    )


def resolve_tasks(config: dict) -> dict[str, Task]:
    """Task name → Task: the demo tasks, the demo tasks packed as X-ARES ones, then
    evaluation.tasks (none when the evaluation is disabled)."""
    if not config["evaluation"]["enabled"]:
        return {}
    eval_out = f"{config['out_dir']}/eval"
    tasks = _demo_tasks(config, eval_out)
    for name, spec in config["evaluation"]["tasks"].items():
        if name in tasks:
            raise ValueError(
                f"config key evaluation.tasks.{name}: the name is taken by a demo task; rename it"
            )
        tasks[name] = _user_task(config, name, spec, eval_out)
    return tasks


def _known_tasks(key: str, names: list[str], tasks: dict[str, Task]) -> None:
    unknown = [t for t in names if t not in tasks]
    if unknown:
        raise ValueError(
            f"config key {key}: {unknown} are not evaluation tasks (known: {sorted(tasks)})"
        )


# ---- stage 3, training


def quick_sets(config: dict, tasks: dict[str, Task]) -> tuple[str, ...]:
    """The quick sets (written by the evaluation stage) of the quick checks during training, or
    none."""
    checks = config["training"]["quick_checks"]
    if not checks["every_epochs"]:
        return ()
    if not checks["tasks"]:
        raise ValueError(
            "config key training.quick_checks.tasks: name the tasks of the quick checks, "
            "or set training.quick_checks.every_epochs: 0"
        )
    _known_tasks("training.quick_checks.tasks", checks["tasks"], tasks)
    return tuple(f"{config['out_dir']}/eval/quick/{t}.npz" for t in checks["tasks"])


def numerics_params(config: dict) -> dict:
    """What the jobs' params say of ``numerics`` (nothing for native: the params, and so the
    provenance hashes and run names, of a native config stay as they were)."""
    return {"numerics": config["numerics"]} if config["numerics"] != "native" else {}


def job_environment(config: dict) -> dict[str, str]:
    """The environment every job runs in for ``numerics`` (empty for native)."""
    return numerics.environment(config["numerics"])


@dataclass(frozen=True)
class Training:
    """The training job: its quick-set inputs, --params, CPUs per node, GPUs (gres),
    resubmissions and sbatch extra."""

    quick_sets: tuple[str, ...]
    params: dict
    threads: int
    gres: str
    retries: int
    slurm_extra: str


def resolve_training(config: dict, tasks: dict[str, Task], remote_exec: bool) -> Training:
    """``retries``: as many resubmissions as the total budget holds per-job slots, minus the
    first (each job resumes from the last step checkpoint). Inside a cluster job (Snakemake's
    ``remote_exec``) none: the rule's retries would otherwise apply there too, and a stopped
    training would restart at once in the same job, to be killed at its time limit.
    ``slurm_extra``: sbatch --signal=URG (every process of the job step ignores SIGURG by
    default; the training driver handles it) signal_lead_s before the time limit."""
    t = config["training"]
    sets = quick_sets(config, tasks)
    gpus = t["gpus_per_node"] if t["use_gpu"] else 0
    jobs = -(-t["total_runtime_min"] // t["runtime_min"])  # ceil, in integers
    return Training(
        quick_sets=sets,
        params={
            "training": t | {"quick_sets": list(sets)},
            "seed": config["seed"],
            **numerics_params(config),
        },
        threads=-(-t["workers"] // t["nodes"]) * t["cpus_per_worker"],  # workers per node
        gres=f"gpu:{gpus}" if gpus else "",
        retries=0 if remote_exec else max(0, jobs - 1),
        slurm_extra=f"'--signal=URG@{t['signal_lead_s']}'" if t["signal_lead_s"] else "",
    )


# ---- the plan before the rules


@dataclass(frozen=True)
class Plan:
    config: dict
    sources: dict[str, Source]
    tasks: dict[str, Task]
    training: Training
    training_metrics: str  # the CSV of the loss-curve plot

    @property
    def out(self) -> str:
        return self.config["out_dir"]


def resolve(config: dict, *, remote_exec: bool = False) -> Plan:
    """Everything the rule files need before any rule is defined (``remote_exec``: Snakemake's,
    true inside a cluster job)."""
    check_inside("out_dir", config["out_dir"], config["allow_outside_paths"])
    sources = resolve_sources(config)
    tasks = resolve_tasks(config)
    training = resolve_training(config, tasks, remote_exec)
    metrics = config["evaluation"]["training_metrics"]
    if metrics:
        check_inside("evaluation.training_metrics", metrics, config["allow_outside_paths"])
    return Plan(
        config=config,
        sources=sources,
        tasks=tasks,
        training=training,
        training_metrics=metrics or f"{config['out_dir']}/training/metrics.csv",
    )


# ---- the data stage's files: where they lie, and what each job reads


@dataclass(frozen=True)
class DataFiles:
    """The data stage's paths under ``out_dir`` and each job's inputs (the rule files' input
    functions call these with their wildcards)."""

    plan: Plan

    @property
    def out(self) -> str:
        return self.plan.out

    def names_in(self, *kinds: str) -> list[str]:
        return [n for n, s in self.plan.sources.items() if s.type in kinds]

    def manifest(self, source: str, chunk: str) -> str:
        return f"{self.out}/manifests/{source}/{chunk}.json"

    def manifests(self, source: str | None = None) -> list[str]:
        """Every chunk manifest (of one source, or of all)."""
        names = [source] if source else list(self.plan.sources)
        return [self.manifest(n, c) for n in names for c in self.plan.sources[n].chunks]

    def shards(self, kind: str) -> list[str]:
        """Every chunk's shard folder (kind "dir") or shard manifest (kind "json")."""
        suffix = "" if kind == "dir" else f".{kind}"
        return [
            f"{self.out}/shards/{n}/{c}{suffix}"
            for n, s in self.plan.sources.items()
            for c in s.chunks
        ]

    def corpus_ids(self, corpus: str) -> str:
        return f"{self.out}/corpora/{corpus}/ids.parquet"

    def source_keys(self, source: str) -> str:
        return f"{self.out}/keys/{source}.parquet"

    def route(self, source: str) -> dict | None:
        """A route's corpus, its ID table and the key tables of the routes before it."""
        route = self.plan.sources[source].route
        if route is None:
            return None
        earlier = [self.source_keys(n) for n in route.earlier]
        return {"corpus": route.corpus, "ids": self.corpus_ids(route.corpus), "earlier": earlier}

    def route_inputs(self, source: str) -> list[str]:
        """A chunk's route inputs: its corpus's ID table (a mirror rejects what the list lacks)
        and the key tables of the earlier routes (what they obtained)."""
        route = self.route(source)
        if route is None:
            return []
        mirror = self.plan.sources[source].type in chunking.MIRROR_TYPES
        return ([route["ids"]] if mirror else []) + route["earlier"]

    def mirror_units(self, source: str, chunk: str) -> list:
        return list(self.plan.sources[source].units[int(chunk)])

    def mirror_inputs(self, source: str, chunk: str) -> list[str]:
        """A mirror chunk's local files (a rule may make them) and its route inputs."""
        units = self.mirror_units(source, chunk)
        src = self.plan.sources[source].cfg
        return chunking.local_inputs(src, units) + self.route_inputs(source)

    def keyed_sources(self) -> list[str]:
        """Sources with a key table: every mirror (its duplicates across chunks) and every
        route a later route builds on."""
        sources = self.plan.sources
        earlier = {n for s in sources.values() if s.route for n in s.route.earlier}
        return [n for n, s in sources.items() if s.type in chunking.MIRROR_TYPES or n in earlier]

    def demo_mirrors(self) -> list[str]:
        """Demo sources that write a mirror of themselves (mirror_share above 0)."""
        return [n for n in self.names_in("demo") if self.plan.sources[n].cfg["mirror_share"] > 0]

    def mel_inputs(self, source: str, chunk: str) -> dict:
        """A mel job's chunk manifest, and for a mirror its source's key table (the mel job
        rejects a key already obtained in an earlier chunk)."""
        mirror = self.plan.sources[source].type in chunking.MIRROR_TYPES
        table = [self.source_keys(source)] if mirror else []
        return {"manifest": self.manifest(source, chunk), "table": table}

    def coverage_layout(self) -> dict:
        """What the coverage report reads: every source's manifests (a mirror's with its key
        table), every corpus's ID table and routes."""
        sources = {
            n: {
                "manifests": self.manifests(n),
                "keys": self.source_keys(n) if s.type in chunking.MIRROR_TYPES else None,
            }
            for n, s in self.plan.sources.items()
        }
        corpora = {
            c: {"ids": self.corpus_ids(c), "routes": list(spec["routes"])}
            for c, spec in self.plan.config["corpora"].items()
        }
        return {"sources": sources, "corpora": corpora, "seed": self.plan.config["seed"]}


# ---- models and targets, once the rules are known

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def is_hub_id(path: str, produced_by_a_rule: Callable[[str], bool]) -> bool:
    """owner/name that is no local path and no rule's output: a Hugging Face repo id."""
    return (
        HUB_ID.fullmatch(path) is not None
        and not path.endswith((".pt", ".safetensors"))
        and not os.path.exists(path)
        and not produced_by_a_rule(path)
    )


RANDOM_PREFIX, LOGMEL, HEAR_PREFIX = "random:", "logmel", "hear:"  # the model spec strings


def spec_path(spec: str) -> str | None:
    """The file (or folder, or hub id) a model spec string names, or None (random, logmel, a HEAR
    module without a path)."""
    if spec.startswith(RANDOM_PREFIX) or spec == LOGMEL:
        return None
    if spec.startswith(HEAR_PREFIX):
        return spec[len(HEAR_PREFIX) :].partition(":")[2] or None
    return spec


def _typed_spec(config: dict, name: str, m: dict) -> str:
    """A ``type:`` entry (with path, size, seed, module) → its model spec string."""
    kind, path = m.get("type"), m.get("path")
    if kind == "checkpoint":
        if path:
            return path
        if name != "trained":
            raise ValueError(f"config key models.{name}.path: a checkpoint model needs a path")
        return f"{config['out_dir']}/training/encoder.safetensors"
    if kind == "random":
        size = m.get("size") or config["training"]["size"]
        return f"{RANDOM_PREFIX}{size}:{config['seed'] if m.get('seed') is None else m['seed']}"
    if kind == "logmel":
        return LOGMEL
    if kind == "hear_module":
        if not m.get("module"):
            raise ValueError(
                f"config key models.{name}.module: a hear_module model needs a module name"
            )
        return f"{HEAR_PREFIX}{m['module']}" + (f":{path}" if path else "")
    raise ValueError(
        f"config key models.{name}: give a spec (the command line's --model, e.g. random:tiny) "
        f"or a type (checkpoint, random, logmel, hear_module)"
    )


def model_spec(config: dict, name: str, produced_by_a_rule: Callable[[str], bool]) -> dict:
    """The model's config → ``{"spec": <model spec string>, "layer": ...}``: the string the command
    line takes as ``--model`` (``spec:`` as written, or made from ``type:`` and its keys: a
    checkpoint "trained" without a path is the training's encoder, a random encoder's size and
    seed default to training.size and seed)."""
    m = config["models"][name]
    if m.get("spec"):
        given = [k for k in ("type", "path", "size", "seed", "module") if m.get(k) is not None]
        if given:
            raise ValueError(
                f"config key models.{name}: give either spec or {', '.join(given)}, not both"
            )
        spec = m["spec"]
    else:
        spec = _typed_spec(config, name, m)
    path = spec_path(spec)
    hear = spec.startswith(HEAR_PREFIX)
    if path and ((not hear and not is_hub_id(path, produced_by_a_rule)) or os.path.exists(path)):
        check_inside(f"models.{name}.path", path, config["allow_outside_paths"])
    return {"spec": spec, "layer": m.get("layer")}


def weights_files(spec: dict, produced_by_a_rule: Callable[[str], bool]) -> list[str]:
    """The model's weights file, so that Snakemake (re)builds embeddings when it changes: a
    checkpoint file, a Hugging Face folder's model.safetensors, none for a hub repo id (fetched
    by the job) or a HEAR module's path that names no file."""
    path = spec_path(spec["spec"])
    if not path:
        return []
    checkpoint = not spec["spec"].startswith(HEAR_PREFIX)
    if checkpoint and os.path.isdir(path):
        return [os.path.join(path, "model.safetensors")]
    if checkpoint and not is_hub_id(path, produced_by_a_rule):
        return [path]
    return [path] if os.path.isfile(path) else []


@dataclass(frozen=True)
class Evaluation:
    """The models (resolved specs and weights files of every model not disabled, and the
    names of those evaluated: ``enabled: auto`` = the weights exist or a rule makes them) and
    the files the evaluation and the report ask for."""

    specs: dict[str, dict]
    weights: dict[str, list[str]]
    models: tuple[str, ...]
    result_files: tuple[str, ...]
    layer_files: tuple[str, ...]
    quick_checks_csv: str | None  # the training's quick checks, when it makes them
    targets: tuple[str, ...]
    provenance_artifacts: tuple[str, ...]


def _models(plan: Plan, produced_by_a_rule) -> tuple[dict[str, dict], tuple[str, ...]]:
    if not plan.config["evaluation"]["enabled"]:
        return {}, ()
    specs, names = {}, []
    for name, m in plan.config["models"].items():
        if m["enabled"] is False:
            continue
        specs[name] = model_spec(plan.config, name, produced_by_a_rule)
        path = spec_path(specs[name]["spec"])
        if m["enabled"] is True or not path or os.path.exists(path) or produced_by_a_rule(path):
            names.append(name)
    return specs, tuple(names)


def _targets(plan: Plan, ev: Evaluation, produced_by_a_rule) -> tuple[str, ...]:
    if not plan.tasks or not ev.models:
        return ()
    eval_out = f"{plan.out}/eval"
    targets = [f"{eval_out}/results/scores.csv", f"{eval_out}/results/comparison.csv"]
    targets += [f"{eval_out}/plots/domains.png", f"{eval_out}/plots/tasks.png"]
    if ev.layer_files:
        targets.append(f"{eval_out}/plots/layers.png")
    if ev.quick_checks_csv and produced_by_a_rule(ev.quick_checks_csv):
        targets.append(f"{eval_out}/plots/quick_checks.png")
    # The loss curve: when the metrics exist, or when the run trains a model it evaluates
    # (never a training run just to draw its curve).
    trains = any(produced_by_a_rule(spec_path(ev.specs[m]["spec"]) or "") for m in ev.models)
    metrics = plan.training_metrics
    if os.path.exists(metrics) or (trains and produced_by_a_rule(metrics)):
        targets.append(f"{eval_out}/plots/loss_curve.png")
    return tuple(targets)


def resolve_evaluation(plan: Plan, produced_by_a_rule: Callable[[str], bool]) -> Evaluation:
    """The models and the files asked for, once every rule is defined: ``produced_by_a_rule(path)``
    tells whether a rule of the workflow writes ``path``."""
    config, eval_out = plan.config, f"{plan.out}/eval"
    specs, models = _models(plan, produced_by_a_rule)
    layers = config["evaluation"]["layers"]["tasks"] if config["evaluation"]["enabled"] else []
    _known_tasks("evaluation.layers.tasks", layers, plan.tasks)
    every = config["training"]["quick_checks"]["every_epochs"]
    ev = Evaluation(
        specs=specs,
        weights={m: weights_files(s, produced_by_a_rule) for m, s in specs.items()},
        models=models,
        result_files=tuple(
            f"{eval_out}/{p}/{m}/{t}.json"
            for t, task in plan.tasks.items()
            for p in task.runs
            for m in models
        ),
        layer_files=tuple(f"{eval_out}/layers/{m}/{t}.json" for m in models for t in layers),
        quick_checks_csv=f"{plan.out}/training/quick_checks.csv"
        if every and "trained" in models
        else None,
        targets=(),
        provenance_artifacts=(),
    )
    targets = _targets(plan, ev, produced_by_a_rule)
    artifacts = [f"{plan.out}/dataset/manifest.json", f"{plan.out}/training/summary.json"]
    if targets:
        artifacts.append(f"{eval_out}/results/summary.json")
    return replace(ev, targets=targets, provenance_artifacts=tuple(artifacts))
