"""The config schema: shipped configs validate, bad keys are named, and the schema is the one
source of defaults (every dataclass default left in the stage code equals the schema's)."""

import copy
import dataclasses

import pytest
import yaml
from helpers import REPO
from snakemake.utils import validate

from dasheng_pipeline.common.audio import ClipRules
from dasheng_pipeline.evaluation.protocols.hear_mlp import ProbeConfig

SCHEMA = str(REPO / "config" / "schema.yaml")
CONFIGS = sorted((REPO / "config").glob("*.yaml"))


@pytest.mark.parametrize(
    "path", [p for p in CONFIGS if p.name != "schema.yaml"], ids=lambda p: p.name
)
def test_shipped_configs_are_valid(path):
    config = yaml.safe_load(path.read_text())
    validate(config, SCHEMA, set_default=True)
    assert (
        config["mel"]["window_s"] == 10.0 and config["mel"]["min_tail_s"] == 1.0
    )  # defaults filled in
    for src in config["sources"].values():  # each type's chunking key, filled in
        assert {"chunk_size", "files_per_chunk", "shards_per_chunk", "archives_per_chunk"} & set(
            src
        )


@pytest.mark.parametrize(
    "path", sorted((REPO / "config" / "presets").glob("*.yaml")), ids=lambda p: p.name
)
def test_training_presets_are_valid(path):
    config = {"sources": {"d": {"type": "demo"}}, **yaml.safe_load(path.read_text())}
    validate(config, SCHEMA, set_default=True)
    assert config["training"]["size"] == path.stem


def test_presets_follow_the_paper():
    load = lambda name: yaml.safe_load((REPO / "config" / "presets" / f"{name}.yaml").read_text())[
        "training"
    ]
    base, big = load("base"), load("1.2B")
    assert (base["lr"], base["weight_decay"], base["global_batch"], base["batches_per_epoch"]) == (
        3e-4,
        0.01,
        256,
        15000,
    )
    assert (big["lr"], big["weight_decay"], big["decoder"]) == (2e-4, 0.0, "dec-56m")


def test_corpus_configs_cover_the_paper_datasets():
    names = {p.stem for p in CONFIGS}
    assert {"audioset", "vggsound", "acav100m", "mtg_jamendo", "config", "schema"} <= names


@pytest.mark.parametrize(
    "config, message",
    [
        ({"sources": {"d": {"type": "demo"}}, "mell": {}}, "'mell' was unexpected"),
        ({"sources": {"d": {"type": "demo", "clip": 3}}}, "'clip' was unexpected"),
        ({"sources": {"d": {"type": "youtube"}}}, "'list' is a required property"),
        (
            {"sources": {"d": {"type": "youtube", "list": "x", "format": "csv"}}},
            "'csv' is not one of",
        ),
        ({"sources": {"../x": {"type": "demo"}}}, "does not match"),
        ({"sources": {"d": {"type": "demo"}}, "audio": {"too_long": "cut"}}, "'cut' is not one of"),
    ],
)
def test_bad_keys_fail_with_a_message_naming_them(config, message):
    with pytest.raises(Exception, match=message):
        validate(config, SCHEMA, set_default=True)


# The dataclasses of the stage code that keep defaults (config records), and the schema section
# holding the same keys.
SCHEMA_SECTIONS = {ClipRules: ("audio",), ProbeConfig: ("evaluation", "probe")}


def _schema_defaults(*section: str) -> dict:
    node = yaml.safe_load(open(SCHEMA))
    for key in section:
        node = node["properties"][key]
    return {k: v["default"] for k, v in node["properties"].items() if "default" in v}


def _dataclass_defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


@pytest.mark.parametrize("cls", list(SCHEMA_SECTIONS), ids=lambda c: c.__name__)
def test_dataclass_defaults_equal_the_schema(cls):
    schema = _schema_defaults(*SCHEMA_SECTIONS[cls])
    ours = _dataclass_defaults(cls)
    assert ours and set(ours) <= set(schema), (
        f"{cls.__name__} has defaults the schema lacks: {set(ours) - set(schema)}"
    )
    assert {k: schema[k] for k in ours} == ours


EVERY_KIND = {  # every source type, model type and task format: every branch of the schema
    "sources": {
        "d": {"type": "demo"},
        "y": {"type": "youtube", "list": "ids.csv"},
        "l": {"type": "local", "root": "tree"},
    },
    "evaluation": {"tasks": {"h": {"path": "h"}, "x": {"path": "x", "format": "xares"}}},
    "models": {
        "c": {"type": "checkpoint", "path": "c.pt"},
        "r": {"type": "random"},
        "m": {"type": "hear_module", "module": "mod"},
        "g": {"type": "logmel"},
    },
}


@pytest.mark.parametrize(
    "config",
    [
        *(
            yaml.safe_load(p.read_text())
            for p in [*CONFIGS, *sorted((REPO / "config" / "presets").glob("*.yaml"))]
            if p.name != "schema.yaml"
        ),
        EVERY_KIND,
        {},
    ],
    ids=lambda c: str(sorted(c))[:30],
)
def test_the_hand_written_defaults_are_snakemakes(config):
    """dasheng_pipeline.common.schema.with_defaults (the base install's, without jsonschema) fills
    in what Snakemake's validate(set_default=True) does, in the same key order."""
    from dasheng_pipeline.common import schema

    ours = schema.with_defaults(config)
    theirs = copy.deepcopy(config)
    validate(theirs, SCHEMA, set_default=True)
    assert ours == theirs
    assert list(ours) == list(theirs) and list(ours["sources"]) == list(theirs["sources"])


def test_the_package_ships_the_workflow_schema():
    from dasheng_pipeline.common import schema

    assert schema.load() == yaml.safe_load(open(SCHEMA))


def test_a_renamed_key_fails_the_workflow_with_one_line_naming_the_new_key(tmp_path):
    from helpers import snakemake

    old = {"sources": {"d": {"type": "demo"}}, "training": {"downstream": {"every_epochs": 3}}}
    proc = snakemake(tmp_path, old, "-n", check=False, timeout=120)
    assert proc.returncode != 0
    line = "config key training.downstream was renamed to training.quick_checks: rename it in the config"
    assert line in (proc.stdout + proc.stderr).splitlines()
