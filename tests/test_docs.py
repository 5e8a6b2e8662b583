"""The documentation a newcomer walks: a short README, and links that lead somewhere.

(The commands the pages show are run, or excused, by tests/e2e/test_readme_commands.py.)
"""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import REPO

README_MAX_LINES = 200
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# [text](target) and ![alt](target), with an optional "title"; the target without its #anchor.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
NOT_A_FILE = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|#)", re.IGNORECASE)  # https:, mailto:, #anchor


def relative_links(text: str) -> list[str]:
    """Link targets that name a file of the repository (code blocks and spans are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    text = re.sub(r"`[^`\n]*`", "", text)
    targets = (match.group(1) for match in LINK.finditer(text))
    return [target.split("#")[0] for target in targets if not NOT_A_FILE.match(target)]


def broken_links(page: Path) -> list[str]:
    return [
        target
        for target in relative_links(page.read_text())
        if not (page.parent / target).resolve().exists()
    ]


def test_the_readme_is_short():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines: move some to docs/"


def test_every_relative_link_points_at_a_file_that_exists():
    broken = {page.relative_to(REPO).as_posix(): broken_links(page) for page in PAGES}
    assert {page: targets for page, targets in broken.items() if targets} == {}


def test_the_readme_links_every_docs_page():
    linked = {
        (REPO / target).resolve() for target in relative_links((REPO / "README.md").read_text())
    }
    unlinked = [page.name for page in PAGES[1:] if page.resolve() not in linked]
    assert unlinked == [], "docs pages the README's reading list does not name"


def test_links_are_found_and_only_relative_ones_kept():
    text = (
        'See [a](docs/a.md#part), ![pic](images/p.png "title"), [web](https://x.org/y),\n'
        "[mail](mailto:a@b.c), [here](#top), `[not](code.md)` and <https://x.org>.\n"
        "```bash\necho [x](in-a-block.md)\n```\n"
    )
    assert relative_links(text) == ["docs/a.md", "images/p.png"]


def test_a_missing_target_is_reported(tmp_path):
    (tmp_path / "there.md").write_text("")
    page = tmp_path / "page.md"
    page.write_text(f"[ok](there.md) [gone](missing.md) [up](../{tmp_path.name})\n")
    assert broken_links(page) == ["missing.md"]
