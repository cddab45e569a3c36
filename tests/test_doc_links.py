"""The Markdown docs' links between files resolve: a link is relative to the file it is in,
and a moved or renamed page breaks the pages that point at it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *ROOT.glob("docs/**/*.md"), *ROOT.glob("client/*.md")])
# [text](target) or [text](target#anchor); a target with a scheme is another site's.
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)\s]*)?\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_link_to_another_file_resolves(page: Path) -> None:
    targets = [m.group(1) for m in LINK.finditer(page.read_text())]
    local = [target for target in targets if "://" not in target and ":" not in target]

    broken = [target for target in local if not (page.parent / target).exists()]

    assert broken == [], f"{page.relative_to(ROOT)} links to missing files: {broken}"


def test_the_check_sees_the_links_it_checks() -> None:
    # The pattern finds the docs' links at all (a check that finds none passes on anything).
    linked = [m.group(1) for page in PAGES for m in LINK.finditer(page.read_text())]
    assert "evaluation.md" in linked and len(linked) > 10
