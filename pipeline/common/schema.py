"""The workflow config's schema (``config/schema.yaml``, shipped in the package as
``dasheng_pipeline/common/schema.yaml``) and its defaults, without jsonschema.

The schema is the one source of defaults. The workflow fills them in with Snakemake's
``validate(config, "config/schema.yaml", set_default=True)`` (jsonschema, from the ``workflow``
extra). The command line (``dasheng-pipeline evaluate --config``) belongs to the base install,
which has no jsonschema, so :func:`with_defaults` is a hand-written filler of the schema's
``default:`` values that follows the same rule as Snakemake's validator: an object schema's
missing ``properties`` get their ``default`` (then filled in turn), and the filler descends
through ``additionalProperties``, ``items``, ``$ref`` (local ``#/...`` only), ``allOf`` and
``if``/``then``/``else``. It does not validate (a wrong value stays wrong) and refuses schema
keywords it does not know how to follow; tests/common/test_plan.py checks that it gives
Snakemake's result on every shipped config.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import yaml

SCHEMA_PATH = Path(__file__).with_name("schema.yaml")

# Keywords whose subschemas could hold defaults but that the filler does not follow.
_UNSUPPORTED = {"anyOf", "oneOf", "not", "patternProperties", "prefixItems", "dependentSchemas"}


def load(path: str | Path = SCHEMA_PATH) -> dict:
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


@functools.cache
def _shipped() -> dict:
    return load()  # read once; with_defaults copies what it takes from it


def with_defaults(config: dict | None, schema: dict | None = None) -> dict:
    """A copy of ``config`` with the schema's defaults (default: the shipped schema) filled in,
    as Snakemake's ``validate(..., set_default=True)`` fills them."""
    schema = _shipped() if schema is None else schema
    out = copy.deepcopy(config or {})
    _fill(out, schema, schema)
    return out


def _resolve(ref: str, root: dict) -> dict:
    if not ref.startswith("#/"):
        raise ValueError(f"schema $ref {ref!r}: only local references (#/...) are followed")
    node = root
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def _fill(instance, node, root: dict) -> None:
    if not isinstance(node, dict):  # true/false schemas
        return
    unsupported = _UNSUPPORTED & set(node)
    if unsupported:
        raise ValueError(f"schema keywords {sorted(unsupported)}: with_defaults cannot follow them")
    if "$ref" in node:
        _fill(instance, _resolve(node["$ref"], root), root)
    if isinstance(instance, dict):
        _fill_object(instance, node, root)
    if isinstance(instance, list) and isinstance(node.get("items"), dict):
        for item in instance:
            _fill(item, node["items"], root)
    for sub in node.get("allOf", []):
        _fill(instance, sub, root)
    if "if" in node:
        branch = node.get("then") if _matches(instance, node["if"], root) else node.get("else")
        _fill(instance, branch, root)


def _fill_object(instance: dict, node: dict, root: dict) -> None:
    props = node.get("properties", {})
    for key, sub in props.items():
        if key not in instance and isinstance(sub, dict) and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
    for key, sub in props.items():
        if key in instance:
            _fill(instance[key], sub, root)
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        for key, value in instance.items():
            if key not in props:
                _fill(value, extra, root)


def _matches(instance, node, root: dict) -> bool:
    """Whether ``instance`` satisfies an ``if`` schema made of ``properties`` with ``const`` or
    ``enum`` (and ``required``): all the conditions the schema's ``if``s use."""
    if "$ref" in node:
        node = {**_resolve(node["$ref"], root), **{k: v for k, v in node.items() if k != "$ref"}}
    known = {"properties", "required", "const", "enum", "description"}
    if set(node) - known:
        raise ValueError(
            f"schema 'if' with {sorted(set(node) - known)}: with_defaults cannot test it"
        )
    if "const" in node and instance != node["const"]:
        return False
    if "enum" in node and instance not in node["enum"]:
        return False
    if not isinstance(instance, dict):
        return True
    if any(key not in instance for key in node.get("required", [])):
        return False
    props = node.get("properties", {})
    return all(_matches(instance[k], sub, root) for k, sub in props.items() if k in instance)
