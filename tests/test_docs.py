"""The README and docs/ pages: every relative link and anchor resolves, and the README keeps the
two commands a newcomer runs first (.ci/run runs the test one)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces as hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} (.+)$", prose(page.read_text()), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        if seen[slug]:
            seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page.read_text())) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_and_anchors_resolve(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(ROOT / "README.md")}
    assert not [p.name for p in PAGES[1:] if p not in linked]


def test_readme_keeps_the_first_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && dogtl demo" in readme
    test_command = "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test]' && python -m pytest -q tests"
    assert test_command in readme
    assert "pip install -q -e '.[test]'" in ci and "python -m pytest -q tests" in ci


def test_the_anchor_rule_matches_github():
    page = ROOT / "README.md"
    assert {"choosing-a-model", "quick-start", "deploying-a-model", "how-long-it-takes"} <= anchors(page)


def test_a_broken_link_is_found(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A `b` c!\n\n[x](page.md#a-b-c) [y](missing.md) [z](#nope)\n```\n[w](not-a-link.md)\n```\n")
    assert links(page) == ["page.md#a-b-c", "missing.md", "#nope"]
    assert anchors(page) == {"a-b-c"}


def test_the_readme_intro_lists_every_command():
    from typer.main import get_command

    from dogtl.cli import app

    intro = (ROOT / "README.md").read_text().split("\n## ")[0]
    missing = [name for name in get_command(app).commands if f"`dogtl {name}`" not in intro]
    assert not missing, f"add them to the README's command table: {missing}"
