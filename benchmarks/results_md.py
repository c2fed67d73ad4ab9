"""RESULTS.md, written section by section: each benchmark owns the section its heading opens."""
from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(heading: str, text: str, results: Path = RESULTS) -> None:
    """Replace the section that opens with `heading` (up to the next `## `) by `text`, or add `text` after the
    title; the other sections stay as they are."""
    old = results.read_text()
    pattern = re.compile(re.escape(heading) + r".*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text + "\n", old, count=1) if pattern.search(old) else \
        old.replace("\n", "\n\n" + text, 1)
    results.write_text(new)
