"""The README is the short way in (issue 25): under 12 KB, and every link it makes into docs/ reaches a file, and
a heading there when it names one. The reference itself is the docs site, which CI builds with
`mkdocs build --strict` (.ci/run)."""

import re
from pathlib import Path

from markdown.extensions.toc import slugify

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
LINK = re.compile(r"\]\((docs/[^)\s]+)\)")


def heading_anchors(page: Path) -> set[str]:
    """The anchors mkdocs gives a page's headings (Python-Markdown's toc extension, whose slugify it uses)."""
    anchors = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        heading = re.match(r"#{1,6} (.+)", line)
        if heading and not in_code:
            anchors.add(slugify(heading[1].strip(), "-"))
    return anchors


def test_readme_is_under_12_kb():
    assert README.stat().st_size < 12 * 1024, f"README.md is {README.stat().st_size} bytes; the reference goes in docs/"


def test_readme_links_into_docs_resolve():
    links = LINK.findall(README.read_text())
    assert links, "the README links to no docs page"
    broken = []
    for link in links:
        path, _, anchor = link.partition("#")
        target = ROOT / path
        if not target.is_file():
            broken.append(f"{link}: no such file")
        elif anchor and anchor not in heading_anchors(target):
            broken.append(f"{link}: no heading with that anchor in {path}")
    assert not broken, "\n".join(broken)

