"""The README and the docs link only to files inside the repository, and those exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from support import REPO

DOCS = [REPO / "README.md", REPO / "isolation" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_links_stay_inside_the_repository(doc: Path):
    bad = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # a web address or an anchor on the same page
        path = (doc.parent / target.split("#")[0]).resolve()
        if not path.is_relative_to(REPO) or not path.exists():
            bad.append(target)
    assert not bad, f"{doc.relative_to(REPO)} links outside the repository or to nothing: {bad}"
