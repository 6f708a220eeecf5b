"""The look of the house, as a newcomer reads it: the layout page names every module (and only
modules that exist), each package's docstring opens with one line saying what it is for, and the
README stays a short front page whose links lead somewhere. (``mkdocs build --strict`` in
``make lint`` checks the site's own links and anchors.)"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from helpers import REPO

# The repository's folders and the names they import as (pyproject.toml's package-dir).
ROOTS = {"model": "dasheng_model", "pipeline": "dasheng_pipeline"}
LAYOUT_PAGE = REPO / "docs" / "development.md"
# A row of the layout's module tables: | `dasheng_pipeline.sources.youtube` | what it is for |
MODULE_ROW = re.compile(r"^\|\s*`(dasheng_(?:model|pipeline)(?:\.\w+)*)`\s*\|(.*)\|\s*$")
README_LINES = 150


def import_name(path: Path) -> str:
    """``pipeline/sources/youtube.py`` → ``dasheng_pipeline.sources.youtube`` (a package's
    ``__init__.py`` → the package)."""
    root, *parts = path.relative_to(REPO).with_suffix("").parts
    if parts and parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([ROOTS[root], *parts])


def source_modules() -> set[str]:
    return {import_name(p) for root in ROOTS for p in (REPO / root).rglob("*.py")}


def layout_rows(text: str) -> dict[str, str]:
    """Module → its line, from the rows of the page's "## Layout" section."""
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    rows = (MODULE_ROW.match(line) for line in section.splitlines())
    return {m.group(1): m.group(2).strip() for m in rows if m}


def test_layout_rows_are_read_as_meant():
    page = (
        "# x\n\n## Layout\n\n| `dasheng_model.mae` | the MAE |\n| path | what |\n"
        "\n## Tests\n| `dasheng_model.hear` | y |\n"
    )
    assert layout_rows(page) == {"dasheng_model.mae": "the MAE"}
    assert import_name(REPO / "pipeline" / "tools" / "finetune" / "__init__.py") == (
        "dasheng_pipeline.tools.finetune"
    )


def test_the_layout_page_names_every_module_and_no_other():
    named = layout_rows(LAYOUT_PAGE.read_text(encoding="utf-8"))
    modules = source_modules()
    missing, stale = sorted(modules - set(named)), sorted(set(named) - modules)
    page = LAYOUT_PAGE.relative_to(REPO)
    assert not missing, (
        f"{page}: add a row '| `module` | what it is for |' under Layout for {missing}"
    )
    assert not stale, f"{page}: these modules do not exist (moved or removed?): {stale}"
    empty = sorted(name for name, line in named.items() if not line)
    assert not empty, f"{page}: say in one line what each is for: {empty}"


@pytest.mark.parametrize(
    "init",
    sorted(p for root in ROOTS for p in (REPO / root).rglob("__init__.py")),
    ids=lambda p: import_name(p),
)
def test_each_package_opens_with_one_line_that_says_what_it_is_for(init: Path):
    doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")), clean=False) or ""
    lines = doc.strip("\n").splitlines() or [""]
    where = init.relative_to(REPO)
    assert lines[0].strip(), f"{where}: the package has no docstring; open it with what it is for"
    assert lines[0].rstrip().endswith("."), f"{where}: the first line is a sentence: {lines[0]!r}"
    assert len(lines) == 1 or not lines[1].strip(), (
        f"{where}: the first line stands alone (a blank line before the details): {lines[0]!r}"
    )


def test_the_readme_is_a_short_front_page_whose_links_exist():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_LINES, (
        f"README.md has {len(text.splitlines())} lines (at most {README_LINES}): move the detail to docs/"
    )
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if not re.match(r"[a-z]+:", t)]
    assert local, "README.md links to no page of the docs"
    broken = [t for t in local if not (REPO / t).exists()]
    assert not broken, f"README.md links to files that do not exist: {broken}"
