"""The installed import names: model/ and pipeline/ install as dasheng_model and dasheng_pipeline,
so a user's own ``model.py`` or ``pipeline/`` in the working folder shadows nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from helpers import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of what it is made of (setuptools writes build/ beside it)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md", "model", "pipeline"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, src / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(src)],
        check=True,
        capture_output=True,
        cwd=out,
    )
    (whl,) = out.glob("dasheng_pipeline-*.whl")
    return whl


def test_the_wheel_has_no_top_level_model_or_pipeline(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"dasheng_model", "dasheng_pipeline"}
    # every package folder of the checkout is in the wheel (the package list in pyproject is explicit)
    for root, name in (("model", "dasheng_model"), ("pipeline", "dasheng_pipeline")):
        for init in (REPO / root).rglob("__init__.py"):
            rel = init.relative_to(REPO / root).as_posix()
            assert f"{name}/{rel}" in names, f"{root}/{rel}: add its package to pyproject.toml"


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = set()
    for root, name in (("model", "dasheng_model"), ("pipeline", "dasheng_pipeline")):
        for init in (REPO / root).rglob("__init__.py"):
            parts = init.parent.relative_to(REPO / root).parts
            found.add(".".join((name, *parts)))
    assert listed == found


def test_a_users_model_py_and_pipeline_folder_shadow_nothing(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(site),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    work = tmp_path / "notebook"
    (work / "pipeline").mkdir(parents=True)
    (work / "model.py").write_text("raise ImportError('the user model.py was imported')\n")
    (work / "pipeline" / "__init__.py").write_text(
        "raise ImportError('the user pipeline/ was imported')\n"
    )
    # only the installed copy (and the venv's dependencies) on the path, the user's folder first
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site)}
    code = (
        "import dasheng_model.pretrained, dasheng_pipeline.tools, dasheng_pipeline.cli;"
        "enc = dasheng_model.pretrained.load('random:tiny');"
        "print(dasheng_model.__file__); print(type(enc).__name__)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    first, kind = proc.stdout.split()
    assert first.startswith(str(site)) and kind == "DashengEncoder"
    cli = subprocess.run(
        [sys.executable, "-m", "dasheng_pipeline.cli", "--help"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 0 and "embed" in cli.stdout, cli.stderr


def test_the_wheel_ships_the_config_schema(wheel):
    """The base install's `evaluate --config` fills in the schema's defaults: the schema is in the
    wheel (a copy of config/schema.yaml, which pipeline/common/schema.yaml links to)."""
    shipped = zipfile.ZipFile(wheel).read("dasheng_pipeline/common/schema.yaml")
    assert shipped == (REPO / "config" / "schema.yaml").read_bytes()
