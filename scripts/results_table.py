"""Build a markdown results table from runs' eval_<split>.json files (written by train.py / evaluate.py).

    python scripts/results_table.py runs/demo runs/demo_user ... [--split test] [--readme README.md]

With --readme, the table replaces the text between `<!-- results:start -->` and `<!-- results:end -->`,
so the README's numbers always come from the runs, never typed by hand.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

START, END = "<!-- results:start -->", "<!-- results:end -->"
COLUMNS = ("i2t R@1", "i2t R@5", "i2t R@10", "t2i R@1", "t2i R@5", "t2i R@10", "R@sum")


def load_result(run_dir: Path, split: str) -> dict:
    path = run_dir / f"eval_{split}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: train the run to the end, or run evaluate.py on its "
                                f"model_best.pth")
    return json.loads(path.read_text())


def row(label: str, result: dict) -> str:
    cells = [result["i2t"]["r1"], result["i2t"]["r5"], result["i2t"]["r10"],
             result["t2i"]["r1"], result["t2i"]["r5"], result["t2i"]["r10"], result["rsum"]]
    return f"| {label} | " + " | ".join(f"{c:.1f}" for c in cells) + " |"


def table(run_dirs: list[Path], split: str) -> str:
    lines = ["| run | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for run in run_dirs:
        result = load_result(run, split)
        lines.append(row(f"`{run.name}`", result))
        for branch in ("instance", "concept"):
            if branch in result:
                lines.append(row(f"`{run.name}` {branch}-only", result[branch]))
    return "\n".join(lines)


def replace_block(text: str, block: str, path: Path) -> str:
    if START not in text or END not in text:
        raise ValueError(f"{path} has no '{START}' ... '{END}' block to replace")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{block}\n{END}{tail}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders holding eval_<split>.json")
    parser.add_argument("--split", default="test")
    parser.add_argument("--readme", type=Path, help="file whose results block is replaced by the table")
    args = parser.parse_args(argv)
    try:
        block = table(args.runs, args.split)
        if args.readme:
            args.readme.write_text(replace_block(args.readme.read_text(), block, args.readme))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
