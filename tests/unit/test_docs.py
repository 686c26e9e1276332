"""The README stays a front page, and no link of it or of docs/ points nowhere."""

from __future__ import annotations

import re

import pytest
from support import ROOT

README_MAX_LINES = 300
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")


def test_the_readme_is_a_front_page_that_links_every_document():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    for document in DOCUMENTS[1:]:
        assert f"(docs/{document.name})" in readme, f"the README never links {document.name}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_every_relative_link_resolves(document):
    for match in LINK.finditer(document.read_text()):
        target = match.group(1)
        if re.match(r"[a-z]+:", target):
            continue
        assert (document.parent / target).exists(), f"{document.name} links {target}"
