"""The README and docs/: every relative link lands on a file and, for `#anchor` links, on a heading of it
(GitHub's anchor rules); the README fits on a few screens; its headline table is the study runner's block in
docs/studies.md, and every study file has its block there, not in the README."""
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "data" / "README.md"]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """`text` without fenced code blocks and inline code, where brackets are code, not links or headings."""
    text = re.sub(r"(?ms)^```.*?^```[^\n]*$", "", text)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: markup dropped, lowercase, punctuation dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in `path`, with GitHub's -1, -2 ... suffixes for repeated headings."""
    seen: dict[str, int] = {}
    found = set()
    for line in re.sub(r"(?ms)^```.*?^```[^\n]*$", "", path.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"#{1,6} (.+)", line)
        if match:
            base = slug(match.group(1))
            found.add(f"{base}-{seen[base]}" if base in seen else base)
            seen[base] = seen.get(base, 0) + 1
    return found


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):  # https:, mailto: ... are not checked (nothing is fetched)
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            broken.append(f"{target} (no heading with that anchor)")
    return broken


def test_the_pages_exist():
    names = {p.name for p in PAGES if p.parent.name == "docs"}
    assert {"README.md", "studies.md", "departures.md", "bad-inputs.md", "gpu.md", "benchmarks.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    assert LINK.findall(prose(page.read_text(encoding="utf-8"))) or page.parent.name == "data", \
        f"{page.name} links nowhere"
    assert broken_links(page) == []


def test_slugs_follow_githubs_rules():
    assert slug("Demo results: CODER's Table 2 with seeds") == "demo-results-coders-table-2-with-seeds"
    assert slug("Table 2 (`configs/demo.yaml` as shipped)") == "table-2-configsdemoyaml-as-shipped"
    assert slug("coder — image-text retrieval") == "coder--image-text-retrieval"


def test_a_broken_link_or_anchor_is_found(tmp_path):
    (tmp_path / "b.md").write_text("# A heading\n## A heading\n```\n# not a heading\n```\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md#a-heading) [ok](b.md#a-heading-1) [no](c.md) [no](b.md#not-a-heading) "
                    "[no](#nowhere) `[code](ignored.md)` [web](https://example.org)\n")
    assert broken_links(page) == ["c.md (no such file)", "b.md#not-a-heading (no heading with that anchor)",
                                  "#nowhere (no heading with that anchor)"]


def test_the_readme_fits_on_a_few_screens():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 250, f"README.md has {lines} lines; move detail into docs/"


def table_rows(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith("|")]


def test_the_readme_headline_table_is_the_runners_table2():
    studies = (REPO / "docs" / "studies.md").read_text(encoding="utf-8")
    block = table_rows(studies.split("<!-- study:demo_table2:start -->")[1].split("<!-- study:demo_table2:end -->")[0])
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Results: CODER's Table 2 on the demo with seeds\n", 1)[1].split("\n## ", 1)[0]
    shown = table_rows(section)
    assert shown and len(shown) == len(block), "the README's headline table lists other rows than Table 2's block"
    columns = [block[0].index(name) for name in shown[0]]  # a column the block lacks fails here
    for mine, theirs in zip(shown[2:], block[2:]):
        assert mine == [theirs[c] for c in columns], f"README row {mine[0]!r} differs from docs/studies.md"


def test_every_study_has_its_block_in_docs_and_none_in_the_readme():
    for path in sorted((REPO / "studies").glob("*.yaml")):
        name = path.stem
        page = yaml.safe_load(path.read_text(encoding="utf-8")).get("page", "docs/studies.md")
        text = (REPO / page).read_text(encoding="utf-8")
        assert f"<!-- study:{name}:start -->" in text and f"<!-- study:{name}:end -->" in text, (name, page)
        assert "--readme" not in path.read_text(encoding="utf-8"), f"{path.name} still names --readme"
    assert "<!-- study:" not in (REPO / "README.md").read_text(encoding="utf-8")
