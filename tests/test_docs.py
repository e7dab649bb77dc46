"""The README and docs/: every relative link and image resolves, to an existing heading where it names one."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> Set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def links() -> Iterator[Tuple[Path, str]]:
    for page in PAGES:
        for match in LINK.finditer(FENCE.sub("", page.read_text())):
            target = match.group(1)
            if not target.startswith(("http://", "https://", "mailto:")):
                yield page, target


def test_the_docs_are_there_and_the_readme_is_a_front_door() -> None:
    names = {p.name for p in PAGES}
    assert {"README.md", "operating.md", "design.md", "benchmarks.md"} <= names
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


@pytest.mark.parametrize("page, target", list(links()), ids=lambda v: str(v).replace(str(ROOT), "."))
def test_every_link_resolves(page: Path, target: str) -> None:
    path, _, fragment = target.partition("#")
    destination = (page.parent / path).resolve() if path else page
    assert destination.exists(), f"{page.name}: {target} does not exist"
    if fragment:
        assert destination.suffix == ".md" and fragment in anchors(destination), \
            f"{page.name}: no heading #{fragment} in {destination.name}"


def test_the_option_tables_in_the_docs_follow_the_code() -> None:
    """Every option of both daemons, with its variable and default, in docs/operating.md (and nothing more)."""
    from gradesvc.config import OPTIONS as GRADESVC
    from lbsvc.settings import OPTIONS as LBSVC

    text = (ROOT / "docs" / "operating.md").read_text()
    for options in (GRADESVC, LBSVC):
        for option in options:
            rows = [line for line in text.splitlines() if line.startswith(f"| `--{option.name}` | `{option.variable}` |")]
            assert len(rows) == 1, option.name
            if option.default:
                assert f"`{option.default}`" in rows[0], (option.name, option.default)
    documented = re.findall(r"^\| `--([a-z-]+)` \| `((?:GRADESVC|LBSVC)_[A-Z_]+)` \|", text, re.M)
    assert sorted(documented) == sorted((o.name, o.variable) for o in (*GRADESVC, *LBSVC))
