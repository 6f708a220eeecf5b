"""The plan of a run (dasheng_pipeline.plan), without Snakemake: a config with the schema's
defaults → chunks, local files, tasks, quick sets, the training job, model specs, targets, and
every cross-key check's one-line error naming its key. (That the plan of config/config.yaml is
what the DAG runs: tests/workflow/test_dag.py; that the defaults are Snakemake's:
tests/workflow/test_config.py.)"""

import os

import pytest
import yaml
from helpers import REPO

from dasheng_pipeline import plan
from dasheng_pipeline.common import schema

NOTHING = lambda path: False  # noqa: E731 (no rule produces anything)
DEMO = {"type": "demo", "clips": 10, "chunk_size": 4}
NO_DEMO_TASKS = {"demo_tasks": {"tasks": [], "speech": False}}


def config(**sections) -> dict:
    """A validated config (the schema's defaults) with these top-level sections."""
    return schema.with_defaults({"sources": {"demo": DEMO}, **sections})


def hear_folder(path):
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Relative paths of a config are the working directory's: a fresh one per test."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---- sources


def test_chunks_of_each_source_type(in_tmp):
    (in_tmp / "ids.csv").write_text("# a comment\nid1,0,10\n\nid2,0,10\r\nid3,5,15\n")
    tree = in_tmp / "tree"
    for name in ("a/1.wav", "a/2.FLAC", "b/3.mp3", "b/notes.txt", ".hidden/4.wav", "b/.5.wav"):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(b"")
    sources = plan.resolve_sources(
        config(
            sources={
                "synth": DEMO,
                "tube": {"type": "youtube", "list": "ids.csv", "chunk_size": 2},
                "disk": {"type": "local", "root": "tree", "chunk_size": 2},
                "empty": {"type": "local", "root": "tree", "extensions": ["ogg"]},
            }
        )
    )
    assert {n: s.chunks for n, s in sources.items()} == {
        "synth": ("00000", "00001", "00002"),  # 10 clips by 4
        "tube": ("00000", "00001"),  # 3 rows (comments and blank lines are no rows) by 2
        "disk": ("00000", "00001"),  # 3 audio files by 2
        "empty": ("00000",),  # no file: one (empty) chunk, as the index job writes
    }
    # the local sources' file counts are the plan's (a param of their index job)
    assert {n: s.files for n, s in sources.items()} == {
        "synth": None,
        "tube": None,
        "disk": 3,
        "empty": 0,
    }
    assert sources["tube"].type == "youtube" and sources["tube"].cfg["format"] == "audioset"


def test_a_new_source_type_is_one_function(monkeypatch):
    made = lambda name, src, allow: plan.Source(name, src, plan.chunk_names(7, 2))  # noqa: E731
    monkeypatch.setitem(plan.SOURCE_TYPES, "made", made)
    cfg = config(sources={"m": {"type": "made"}})  # (the schema would refuse it; the plan does not)
    assert plan.resolve_sources(cfg)["m"].chunks == ("00000", "00001", "00002", "00003")


# ---- tasks


def test_demo_tasks_their_xares_packs_and_user_tasks(in_tmp):
    hear = hear_folder(in_tmp / "hear_task")
    cfg = config(
        evaluation={
            "demo_tasks": {
                "tasks": ["demo_pitch", "demo_noise"],
                "speech": False,
                "xares": ["demo_noise", "demo_keyword"],  # keyword does not run: not packed
            },
            "knn": {"exclude": ["demo_pitch"]},
            "tasks": {
                "mine": {"path": hear, "domain": "music"},
                "x": {"path": "shards", "format": "xares", "folds": [1, 2, 3], "xares_name": "xx"},
                "knn_only": {"path": hear, "protocols": ["knn", "xares_knn"]},
            },
        }
    )
    tasks = plan.resolve_tasks(cfg)
    assert list(tasks) == ["demo_pitch", "demo_noise", "demo_noise_xares", "mine", "x", "knn_only"]
    out = "results/demo/eval"
    assert tasks["demo_pitch"] == plan.Task(
        "demo_pitch", f"{out}/tasks/demo_pitch", "hear", ("probe",), demo=True
    )
    assert tasks["demo_noise"].runs == ("probe", "knn")
    packed = tasks["demo_noise_xares"]
    assert (packed.format, packed.demo, packed.packed_demo) == ("xares", False, True)
    assert packed.source == f"{out}/xares_sources/demo_noise_xares"
    assert packed.xares["path"] == packed.source and packed.xares["folds"]
    assert (
        packed.runs == ("xares_mlp", "xares_knn") and packed.dir == f"{out}/tasks/demo_noise_xares"
    )
    assert (tasks["mine"].dir, tasks["mine"].runs, tasks["mine"].domain) == (
        hear,
        ("probe", "knn"),
        "music",
    )
    x = tasks["x"]
    assert (x.dir, x.source, x.xares_name) == (f"{out}/tasks/x", "shards", "xx")
    assert x.xares == {
        "path": "shards",
        "label": "label",
        "kind": "multiclass",
        "splits": None,
        "folds": [1, 2, 3],
        "split_pattern": "{split}*.tar",
        "fold_pattern": "wds-audio-fold-{fold}-*.tar",
        "labels": None,
        "label_sep": None,
        "weight": None,
        "xares_name": "xx",
        "domain": None,
        "mlp": {},
    }
    assert tasks["knn_only"].runs == ("knn", "xares_knn")
    cfg["evaluation"]["knn"]["enabled"] = False
    assert plan.resolve_tasks(cfg)["knn_only"].runs == ("xares_knn",)
    cfg["evaluation"]["enabled"] = False
    assert plan.resolve_tasks(cfg) == {}


def test_the_default_demo_tasks():
    tasks = plan.resolve_tasks(config(evaluation={"demo_tasks": {"speech": False}}))
    assert list(tasks) == ["demo_pitch", "demo_timbre", "demo_noise", "demo_events"]
    assert all(t.demo and t.format == "hear" for t in tasks.values())


# ---- training


def test_training_job_and_its_quick_sets():
    cfg = config(
        evaluation={"demo_tasks": {"tasks": ["demo_pitch", "demo_noise"], "speech": False}},
        training={
            "workers": 5,
            "nodes": 2,
            "cpus_per_worker": 4,
            "gpus_per_node": 4,
            "runtime_min": 60,
            "total_runtime_min": 150,
            "signal_lead_s": 90,
            "quick_checks": {"every_epochs": 2, "tasks": ["demo_noise"]},
        },
    )
    job = plan.resolve(cfg).training
    sets = ("results/demo/eval/quick/demo_noise.npz",)
    assert job.quick_sets == sets
    assert (job.threads, job.gres, job.retries, job.slurm_extra) == (
        12,  # ceil(5 workers / 2 nodes) * 4 CPUs
        "gpu:4",
        2,  # 3 jobs of 60 min hold 150 min: 2 resubmissions
        "'--signal=URG@90'",
    )
    assert job.params == {"training": cfg["training"] | {"quick_sets": list(sets)}, "seed": 0}
    assert plan.resolve(cfg, remote_exec=True).training.retries == 0  # inside a cluster job
    cfg["training"] |= {"use_gpu": False, "signal_lead_s": 0}
    cfg["training"]["quick_checks"]["every_epochs"] = 0
    job = plan.resolve(cfg).training
    assert (job.gres, job.slurm_extra, job.quick_sets) == ("", "", ())
    assert job.params == {"training": cfg["training"] | {"quick_sets": []}, "seed": 0}


# ---- models


def test_model_specs_resolve_to_the_command_lines_spec_strings(in_tmp):
    cfg = config(
        seed=7,
        training={"size": "tiny"},
        models={
            "trained": {"type": "checkpoint"},
            "random": {"type": "random"},
            "random0": {"type": "random", "size": "base", "seed": 0, "layer": 3},
            "hub": {"type": "checkpoint", "path": "mispeech/dasheng-base"},
            "hear": {"type": "hear_module", "module": "my.module", "path": "x/y"},
            "bare": {"type": "hear_module", "module": "my.module"},
            "logmel": {"type": "logmel"},
            "given": {"spec": "random:tiny:3", "layer": "mean"},
        },
    )
    spec = lambda name, produced=NOTHING: plan.model_spec(cfg, name, produced)  # noqa: E731
    assert spec("trained") == {"spec": "results/demo/training/encoder.safetensors", "layer": None}
    assert spec("random") == {"spec": "random:tiny:7", "layer": None}
    assert spec("random0") == {"spec": "random:base:0", "layer": 3}
    assert [spec(m)["spec"] for m in ("hub", "hear", "bare", "logmel")] == [
        "mispeech/dasheng-base",
        "hear:my.module:x/y",
        "hear:my.module",
        "logmel",
    ]
    assert spec("given") == {"spec": "random:tiny:3", "layer": "mean"}  # as written
    assert plan.is_hub_id("mispeech/dasheng-base", NOTHING)
    assert plan.weights_files(spec("hub"), NOTHING) == []  # fetched by the job
    made = lambda path: path == "mispeech/dasheng-base"  # noqa: E731
    assert not plan.is_hub_id("mispeech/dasheng-base", made)  # a rule's output, not a repo id
    assert plan.weights_files(spec("hub", made), made) == ["mispeech/dasheng-base"]
    assert not plan.is_hub_id("owner/model.pt", NOTHING)
    assert plan.weights_files(spec("hear"), NOTHING) == []  # a path that names no file
    assert (
        plan.weights_files(spec("random"), NOTHING)
        == plan.weights_files(spec("bare"), NOTHING)
        == []
    )
    (in_tmp / "x").mkdir()
    (in_tmp / "x/y").write_bytes(b"")
    assert plan.weights_files(spec("hear"), NOTHING) == ["x/y"]
    (in_tmp / "hf").mkdir()
    assert plan.weights_files({"spec": "hf", "layer": None}, NOTHING) == [
        os.path.join("hf", "model.safetensors")
    ]


def test_models_evaluated_and_the_targets():
    cfg = config(
        evaluation={
            "demo_tasks": {"tasks": ["demo_noise"], "speech": False},
            "layers": {"tasks": ["demo_noise"]},
        },
        training={"quick_checks": {"every_epochs": 1, "tasks": ["demo_noise"]}},
        models={
            "trained": {"type": "checkpoint", "enabled": "auto"},
            "logmel": {"type": "logmel"},
            "off": {"type": "checkpoint", "enabled": False},  # no path: never resolved
        },
    )
    p = plan.resolve(cfg)
    alone = plan.resolve_evaluation(p, NOTHING)  # nothing trains: no trained model
    assert alone.models == ("logmel",) and set(alone.specs) == {"trained", "logmel"}
    assert alone.quick_checks_csv is None
    ev = "results/demo/eval"
    assert alone.result_files == (
        f"{ev}/probe/logmel/demo_noise.json",
        f"{ev}/knn/logmel/demo_noise.json",
    )
    assert alone.targets == (
        f"{ev}/results/scores.csv",
        f"{ev}/results/comparison.csv",
        f"{ev}/plots/domains.png",
        f"{ev}/plots/tasks.png",
        f"{ev}/plots/layers.png",
    )
    training = {
        f"results/demo/training/{name}"
        for name in ("encoder.safetensors", "metrics.csv", "quick_checks.csv")
    }
    trains = plan.resolve_evaluation(p, training.__contains__)
    assert trains.models == ("trained", "logmel")
    assert trains.weights["trained"] == ["results/demo/training/encoder.safetensors"]
    assert trains.quick_checks_csv == "results/demo/training/quick_checks.csv"
    assert trains.layer_files == (
        f"{ev}/layers/trained/demo_noise.json",
        f"{ev}/layers/logmel/demo_noise.json",
    )
    assert trains.targets[-2:] == (f"{ev}/plots/quick_checks.png", f"{ev}/plots/loss_curve.png")
    assert trains.provenance_artifacts == (
        "results/demo/dataset/manifest.json",
        "results/demo/training/summary.json",
        f"{ev}/results/summary.json",
    )
    cfg["evaluation"]["enabled"] = False
    cfg["training"]["quick_checks"]["every_epochs"] = 0
    off = plan.resolve_evaluation(plan.resolve(cfg), training.__contains__)
    assert (off.models, off.targets, off.specs) == ((), (), {})
    assert off.provenance_artifacts == trains.provenance_artifacts[:2]


# ---- every cross-key check names its key


def _outside(tmp_path):
    return str(tmp_path.parent / "elsewhere")


ERRORS = [
    ({"out_dir": "OUTSIDE"}, "config key out_dir: .* lies outside the working directory"),
    (
        {"sources": {"s": {"type": "youtube", "list": "OUTSIDE"}}},
        "config key sources.s.list: .* outside",
    ),
    (
        {"sources": {"s": {"type": "youtube", "list": "l.csv", "cookies": "OUTSIDE"}}},
        "config key sources.s.cookies: .* outside",
    ),
    (
        {"sources": {"s": {"type": "youtube", "list": "none.csv"}}},
        "config key sources.s.list: segment list 'none.csv' not found",
    ),
    (
        {"sources": {"s": {"type": "local", "root": "OUTSIDE"}}},
        "config key sources.s.root: .* outside",
    ),
    (
        {"sources": {"s": {"type": "local", "root": "none"}}},
        "config key sources.s.root: 'none' is not a folder",
    ),
    (
        {"sources": {"s": {"type": "local", "root": "tree", "labels": "csv"}}},
        "config key sources.s.labels_csv: required when labels is 'csv'",
    ),
    (
        {
            "sources": {
                "s": {"type": "local", "root": "tree", "labels": "csv", "labels_csv": "OUTSIDE"}
            }
        },
        "config key sources.s.labels_csv: .* outside",
    ),
    (
        {"evaluation": {"tasks": {"t": {"path": "OUTSIDE"}}}},
        "config key evaluation.tasks.t.path: .* outside",
    ),
    (
        {"evaluation": {"tasks": {"t": {"path": "t", "format": "xares"}}}},
        "config key evaluation.tasks.t: an X-ARES task needs 'splits' or 'folds'",
    ),
    (
        {"evaluation": {"demo_tasks": {"speech": False}, "tasks": {"demo_noise": {"path": "t"}}}},
        "config key evaluation.tasks.demo_noise: the name is taken by a demo task; rename it",
    ),
    (
        {
            "evaluation": {
                "demo_tasks": {"xares": ["demo_noise"], "speech": False},
                "tasks": {"demo_noise_xares": {"path": "t"}},
            }
        },
        "config key evaluation.tasks.demo_noise_xares: the name is taken by a demo task",
    ),
    (
        {"evaluation": {"training_metrics": "OUTSIDE"}},
        "config key evaluation.training_metrics: .* outside",
    ),
    (
        {"training": {"quick_checks": {"every_epochs": 1}}},
        "config key training.quick_checks.tasks: name the tasks of the quick checks, "
        "or set training.quick_checks.every_epochs: 0",
    ),
    (
        {
            "training": {"quick_checks": {"every_epochs": 1, "tasks": ["esc50"]}},
            "evaluation": {"enabled": False},
        },
        r"config key training.quick_checks.tasks: \['esc50'\] are not evaluation tasks \(known: \[\]\)",
    ),
    ({"sources": {"s": {"type": "ftp"}}}, "config key sources.s.type: 'ftp' is not one of"),
]
LATE_ERRORS = [  # resolve_evaluation's (models, layers): raised once the rules are known
    (
        {
            "evaluation": {
                "demo_tasks": {"tasks": ["demo_noise"], "speech": False},
                "layers": {"tasks": ["esc50"]},
            }
        },
        r"config key evaluation.layers.tasks: \['esc50'\] are not evaluation tasks \(known: \['demo_noise'\]\)",
    ),
    (
        {"models": {"m": {"type": "checkpoint"}}},
        "config key models.m.path: a checkpoint model needs a path",
    ),
    (
        {"models": {"m": {"type": "checkpoint", "path": "OUTSIDE"}}},
        "config key models.m.path: .* outside",
    ),
    (
        {"models": {"m": {"type": "hear_module"}}},
        "config key models.m.module: a hear_module model needs a module name",
    ),
    (
        {"models": {"m": {"spec": "random:tiny", "type": "random"}}},
        "config key models.m: give either spec or type, not both",
    ),
    ({"models": {"m": {"layer": 2}}}, "config key models.m: give a spec .* or a type"),
    ({"models": {"m": {"spec": "OUTSIDE"}}}, "config key models.m.path: .* outside"),
]


def _confined(sections, tmp_path):
    (tmp_path / "tree").mkdir(exist_ok=True)
    (tmp_path / "l.csv").write_text("id,0,10\n")
    text = yaml.safe_dump(sections).replace("OUTSIDE", _outside(tmp_path))
    return config(allow_outside_paths=False, **yaml.safe_load(text))


@pytest.mark.parametrize("sections, message", ERRORS, ids=lambda v: str(v)[:40])
def test_each_cross_key_error_names_its_key(sections, message, in_tmp):
    with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
        plan.resolve(_confined(sections, in_tmp))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("sections, message", LATE_ERRORS, ids=lambda v: str(v)[:40])
def test_each_model_and_layer_error_names_its_key(sections, message, in_tmp):
    p = plan.resolve(_confined(sections, in_tmp))
    with pytest.raises(ValueError, match=message) as err:
        plan.resolve_evaluation(p, NOTHING)
    assert "\n" not in str(err.value)


def test_a_renamed_key_names_the_new_one(in_tmp):
    (in_tmp / "old.yaml").write_text("training:\n  downstream: {every_epochs: 3}\n")
    with pytest.raises(ValueError) as err:
        plan.read_config(in_tmp / "old.yaml")
    assert str(err.value) == (
        "config key training.downstream was renamed to training.quick_checks: rename it in the config"
    )
    plan.check_renamed_keys({"training": {"quick_checks": {}}, "downstream": 1})  # other keys pass


def test_paths_inside_pass_when_confined(in_tmp):
    cfg = _confined({"sources": {"s": {"type": "local", "root": "tree"}}}, in_tmp)
    assert plan.resolve(cfg).sources["s"].files == 0


# ---- outside Snakemake


def test_read_config_gives_the_schema_defaults(in_tmp):
    assert plan.read_config(None)["evaluation"]["knn"] == {
        "enabled": True,
        "k": 10,
        "use_valid": True,
        "exclude": [],
    }
    demo = plan.read_config(REPO / "config" / "config.yaml")
    assert demo["evaluation"]["probe"]["max_epochs"] == 100  # the file's
    assert demo["evaluation"]["probe"]["hidden_dim"] == 1024  # the schema's
    assert plan.resolve(demo).sources["demo"].chunks == ("00000", "00001", "00002", "00003")


def test_the_evaluate_command_resolves_as_the_workflow(in_tmp):
    from pathlib import Path

    from dasheng_pipeline.tools import evaluate

    settings = evaluate.settings_from_config(None)
    schema_eval = plan.read_config(None)["evaluation"]
    assert [settings[k] for k in ("probe", "knn", "xares")] == [
        schema_eval[k] for k in ("probe", "knn", "xares")
    ]
    assert settings["embed"] == {
        "seed": 0,
        "batch_size": 16,
        "frames": "events",
        "decode_threads": 2,
    }
    mine = {"path": "shards", "format": "xares", "folds": [1, 2, 3]}
    (in_tmp / "cfg.yaml").write_text(
        yaml.safe_dump({"seed": 4, "evaluation": {"knn": {"k": 3}, "tasks": {"x": mine}}})
    )
    settings = evaluate.settings_from_config("cfg.yaml")
    assert (settings["seed"], settings["knn"]["k"], settings["knn"]["use_valid"]) == (4, 3, True)
    # an X-ARES folder gets the reader config the DAG's xares_task rule gets (found by name)
    name, entry = evaluate.xares_entry(Path("copy/x"), settings["config"], "in cfg.yaml")
    assert (name, entry) == (
        "x",
        plan.resolve_tasks(settings["config"])["x"].xares | {"path": "copy/x"},
    )
    with pytest.raises(ValueError, match="no evaluation.tasks entry in cfg.yaml names it"):
        evaluate.xares_entry(Path("y"), settings["config"], "in cfg.yaml")


def test_the_data_files_of_the_demo_with_its_route():
    """The demo's held-out corpus: a mirror (route 1) and the generator (route 2) with an ID list."""
    data = plan.DataFiles(plan.resolve(plan.read_config(REPO / "config" / "config.yaml")))
    out = "results/demo"
    assert data.names_in("hf_parquet") == ["demo_valid_mirror"]
    assert data.demo_mirrors() == ["demo_valid"]
    assert data.keyed_sources() == ["demo_valid_mirror"]
    ids, keys = f"{out}/corpora/demo_valid/ids.parquet", f"{out}/keys/demo_valid_mirror.parquet"
    assert data.route("demo_valid") == {"corpus": "demo_valid", "ids": ids, "earlier": [keys]}
    assert data.route_inputs("demo_valid") == [keys]  # the generator fills what the mirror lacks
    assert data.route_inputs("demo_valid_mirror") == [ids]  # a mirror rejects what the list lacks
    assert data.route("demo") is None and data.route_inputs("demo") == []
    assert data.mirror_inputs("demo_valid_mirror", "00000") == [
        f"{out}/mirror/demo_valid/data/demo_valid-00000.parquet",
        ids,
    ]
    assert data.mel_inputs("demo_valid_mirror", "00000")["table"] == [keys]
    assert data.mel_inputs("demo", "00001") == {
        "manifest": f"{out}/manifests/demo/00001.json",
        "table": [],
    }
    layout = data.coverage_layout()
    assert layout["corpora"] == {
        "demo_valid": {"ids": ids, "routes": ["demo_valid_mirror", "demo_valid"]}
    }
    assert layout["sources"]["demo_valid_mirror"]["keys"] == keys
    assert len(data.manifests()) == len(data.shards("json")) == len(data.shards("dir"))
