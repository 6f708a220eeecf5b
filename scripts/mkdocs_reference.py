"""mkdocs hook: the API reference, one page per package, generated from the source tree.

Every package under ``model/`` and ``pipeline/`` (a folder with ``__init__.py``) gets a page
``reference/<dotted name>.md`` that renders the package's docstring and each of its modules
through mkdocstrings, and a place in the nav under "API reference". The pages are made at build
time from the folders as they are, so a module that moves, appears or goes needs no edit here:
the docstrings are the one copy of the reference. ``mkdocs.yml`` names this file under ``hooks:``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from mkdocs.structure.files import File

REPO = Path(__file__).resolve().parent.parent
# The repository's folders and the names they import as (pyproject.toml's package-dir).
ROOTS = {"model": "dasheng_model", "pipeline": "dasheng_pipeline"}
NAV_TITLE = "API reference"
# The docstrings cross-reference in Sphinx's roles (:func:`name`); Markdown shows the role's text.
ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|exc|obj):(?=<code>)")


def packages() -> dict[str, list[str]]:
    """Each package's dotted name → the dotted names of its modules (not sub-packages), sorted."""
    found: dict[str, list[str]] = {}
    for folder, name in ROOTS.items():
        for init in sorted((REPO / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(REPO / folder)
            package = ".".join([name, *rel.parts])
            modules = sorted(p.stem for p in init.parent.glob("*.py") if p.stem != "__init__")
            found[package] = [f"{package}.{m}" for m in modules]
    return found


def summary(package: str) -> str:
    """The first line of a package's docstring ('' when it has none)."""
    root, *rest = package.split(".")
    folder = {v: k for k, v in ROOTS.items()}[root]
    init = REPO.joinpath(folder, *rest, "__init__.py")
    doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def page(package: str, modules: list[str]) -> str:
    lines = [
        f"# `{package}`",
        "",
        f"::: {package}",
        "    options:",
        "      show_root_heading: false",
    ]
    for module in modules:
        lines += ["", f"::: {module}"]
    return "\n".join(lines) + "\n"


def index(found: dict[str, list[str]]) -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings at build time: one page per package, each module of the",
        "package on it. Where each module sits in the pipeline: [Development](../development.md#layout).",
        "",
        "| package | what it is for |",
        "|---|---|",
    ]
    lines += [f"| [`{p}`]({p}.md) | {summary(p)} |" for p in found]
    return "\n".join(lines) + "\n"


def on_config(config):
    """Fill the nav's "API reference" entry with the generated pages."""
    pages = [{"Overview": "reference/index.md"}]
    pages += [{p: f"reference/{p}.md"} for p in packages()]
    nav = config["nav"] or []
    for i, entry in enumerate(nav):
        if isinstance(entry, dict) and NAV_TITLE in entry:
            nav[i] = {NAV_TITLE: pages}
            return config
    nav.append({NAV_TITLE: pages})
    return config


def on_files(files, config):
    """Add the generated pages to the site's files."""
    found = packages()
    files.append(File.generated(config, "reference/index.md", content=index(found)))
    for package, modules in found.items():
        files.append(
            File.generated(config, f"reference/{package}.md", content=page(package, modules))
        )
    return files


def on_page_content(html, page, config, files):
    """Drop the Sphinx role prefixes from the rendered docstrings (the name stays, as code)."""
    return ROLE.sub("", html) if page.file.src_uri.startswith("reference/") else html
