"""The documentation a newcomer reads: its links resolve, and the README keeps its shape."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = sorted([Path("README.md"), Path("BENCHMARKS.md"), *Path("docs").glob("*.md")])
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")


@pytest.mark.parametrize("doc", DOCS, ids=str)
def test_relative_links_resolve(doc: Path) -> None:
    targets = [m.group(1) for m in LINK.finditer(doc.read_text())]
    missing = [t for t in targets if "://" not in t and not (doc.parent / t).exists()]
    assert not missing


def test_readme_opens_with_the_two_commands_and_stays_short() -> None:
    text = Path("README.md").read_text()
    assert len(text.split()) < 1500, "move long sections to docs/"
    setup = text.index("## Set-up: the two commands")
    assert text.index("make demo") > setup and text.index("make test") > setup
    assert text.index("## Three common tasks") > setup
    assert Path(".ci/run").read_text().strip().endswith("make test")
