"""Build a markdown results table from runs' eval_<split>.json files (written by train.py / evaluate.py).

    python scripts/results_table.py runs/demo runs/demo_user ... [--split test] [--readme README.md]

One row per run: its data set, best epoch, the protocol's R@K and R@sum (COCO: the 5-fold 1K average) and,
for COCO, the 5K R@sum; then the branch rows of concept models. Under the table, the config keys in which
the runs differ (read from each run's config.yaml), so a comparison says what was compared.

With --readme, the table replaces the text between `<!-- results:start -->` and `<!-- results:end -->`,
so the README's numbers always come from the runs, never typed by hand.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from coder.checkpoint import flatten

START, END = "<!-- results:start -->", "<!-- results:end -->"
COLUMNS = ("data", "best epoch", "i2t R@1", "i2t R@5", "i2t R@10", "t2i R@1", "t2i R@5", "t2i R@10", "R@sum",
           "5K R@sum")


def load_result(run_dir: Path, split: str) -> dict:
    path = run_dir / f"eval_{split}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: train the run to the end, or run evaluate.py on its "
                                f"model_best.pth")
    return json.loads(path.read_text())


def row(label: str, result: dict, dataset: str = "", epoch="") -> str:
    cells = [result["i2t"]["r1"], result["i2t"]["r5"], result["i2t"]["r10"],
             result["t2i"]["r1"], result["t2i"]["r5"], result["t2i"]["r10"], result["rsum"]]
    five_k = f"{result['5k']['rsum']:.1f}" if "5k" in result else ""
    return f"| {label} | {dataset} | {epoch} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {five_k} |"


def differing_keys(run_dirs: list[Path]) -> list[str]:
    """'key: run=value, ...' for every config key whose value is not the same in all runs (name excluded)."""
    configs = {}
    for run in run_dirs:
        path = run / "config.yaml"
        configs[run.name] = flatten(yaml.safe_load(path.read_text())) if path.is_file() else {}
    keys = sorted({k for c in configs.values() for k in c} - {"name"})
    lines = []
    for key in keys:
        values = {name: c.get(key) for name, c in configs.items()}
        if len({repr(v) for v in values.values()}) > 1:
            lines.append(f"`{key}`: " + ", ".join(f"{name}={v}" for name, v in values.items()))
    return lines


def table(run_dirs: list[Path], split: str) -> str:
    lines = ["| run | " + " | ".join(COLUMNS) + " |", "|---|---|---:|" + "---:|" * (len(COLUMNS) - 2)]
    for run in run_dirs:
        result = load_result(run, split)
        dataset = f"{result.get('dataset', '')} {result.get('split', '')}".strip()
        lines.append(row(f"`{run.name}`", result, dataset, result.get("best_epoch", "")))
        for branch in ("instance", "concept"):
            if branch in result:
                lines.append(row(f"`{run.name}` {branch}-only", result[branch]))
    differ = differing_keys(run_dirs) if len(run_dirs) > 1 else []
    if differ:
        lines += ["", "Config keys that differ: " + "; ".join(differ)]
    return "\n".join(lines)


def replace_block(text: str, block: str, path: Path, start: str = START, end: str = END) -> str:
    """`text` with what lies between the `start` and `end` markers replaced by `block`."""
    if start not in text or end not in text:
        raise ValueError(f"{path} has no '{start}' ... '{end}' block to replace")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{block}\n{end}{tail}"


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
