"""Seed noise against training length: per epoch, each group's dev R@sum as mean ± sample std over seeds, and the
paired difference of every group against the first (same seed, same data order) as mean ± standard error.

    python scripts/seed_curve.py triplet=runs/seedcurve/triplet coder=runs/seedcurve/coder \
        [--docs [docs/studies.md]] [--block seed_curve] [--seeds 0 1 2]

A group is LABEL=FOLDER, its runs FOLDER/seed<k>/ as scripts/study.py lays them out. Dev R@sum per epoch is read from
each run's record (scripts/run_record.py), made from its TensorBoard tag `dev/rsum` (one value per epoch, the last one
logged if a resumed run logged an epoch twice); the last row is test R@sum of the dev-selected checkpoint
(eval_test.json), at the epoch count the run was trained to. A paired difference uses only the seeds both groups have at
that epoch. `s / epoch` is the median wall time between consecutive dev evaluations of one process (one epoch of
training plus one dev evaluation), as the run measured it on its machine. With --docs, the table replaces the block
`<!-- study:NAME:start -->` ... `<!-- study:NAME:end -->` (NAME from --block) of docs/studies.md (`--docs FILE`: of
another page; never of a README; `--readme` is the flag's former name)."""
from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
from pathlib import Path

from results_table import replace_block  # scripts/ is on sys.path when a script runs
from run_record import DEV_TAG, scalars
from run_record import read as read_record
from study import DOCS, StudyError, check_docs_page, markers

TEST = "test"  # the row key of the test R@sum (best-dev checkpoint)


def read_run(folder: Path) -> tuple[dict, list[float]]:
    """{epoch (1-based): dev R@sum, 'test': test R@sum} of one run, and the seconds between its consecutive dev
    evaluations within one process: a finished run's record (scripts/run_record.py), else its events so far."""
    record = read_record(folder)
    if record is None:  # still training: its dev curve so far
        points, durations = scalars(folder)
        return {step + 1: value for step, value in points.get(DEV_TAG, [])}, durations
    scores = {int(epoch): value for epoch, value in record["dev_rsum"].items()}
    if "test" in record["eval"]:
        scores[TEST] = record["eval"]["test"]["rsum"]
    return scores, record["epoch_seconds"]


def read_group(folder: Path, seeds: set[int] | None = None) -> tuple[dict[int, dict], list[float]]:
    """{seed: scores} over FOLDER/seed<k>/ (only the `seeds` given, if any) and the group's epoch durations (s)
    between consecutive dev evals."""
    runs, durations = {}, []
    for run in sorted(folder.glob("seed*")):
        match = re.fullmatch(r"seed(\d+)", run.name)
        if match and run.is_dir() and (seeds is None or int(match.group(1)) in seeds):
            runs[int(match.group(1))], seconds = read_run(run)
            durations += seconds
    return runs, durations


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f} (1)"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f} ({len(values)})"


def paired(reference: dict[int, dict], other: dict[int, dict], key) -> str:
    """Mean ± standard error (sample std / sqrt(n)) of other - reference over the seeds both have at `key`."""
    deltas = [other[s][key] - reference[s][key] for s in sorted(set(reference) & set(other))
              if key in reference[s] and key in other[s]]
    if not deltas:
        return "–"
    if len(deltas) == 1:
        return f"{deltas[0]:+.1f} (1)"
    se = statistics.stdev(deltas) / math.sqrt(len(deltas))
    return f"{statistics.mean(deltas):+.1f} ± {se:.1f} ({len(deltas)})"


def table(groups: dict[str, Path], seeds: set[int] | None = None) -> str:
    """Markdown: one row per epoch and a test row; per group mean ± std (n), per other group Δ ± SE (n); over the
    `seeds` given, else every seed folder."""
    data = {label: read_group(folder, seeds) for label, folder in groups.items()}
    labels = list(groups)
    ref = labels[0]
    epochs = sorted({k for runs, _ in data.values() for r in runs.values() for k in r if k != TEST})
    header = ["epoch"] + [f"{g} dev R@sum" for g in labels] + [f"{g} − {ref}" for g in labels[1:]]
    lines = ["| " + " | ".join(header) + " |", "|---:|" + "---:|" * (len(header) - 1)]
    for key in epochs + [TEST]:
        cells = [mean_std([r[key] for r in data[g][0].values() if key in r]) for g in labels]
        cells += [paired(data[ref][0], data[g][0], key) for g in labels[1:]]
        name = "test (best dev)" if key == TEST else str(key)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    seconds = ", ".join(f"{g} {statistics.median(data[g][1]):.0f}" if data[g][1] else f"{g} –" for g in labels)
    lines += ["", f"Mean ± sample std over seeds (n); Δ: paired per seed, mean ± standard error (n). "
              f"s / epoch (median, training + dev evaluation): {seconds}."]
    return "\n".join(lines)


def parse_group(text: str) -> tuple[str, Path]:
    label, sep, folder = text.partition("=")
    if not sep or not label or not folder:
        raise argparse.ArgumentTypeError(f"group '{text}': expected LABEL=FOLDER")
    return label, Path(folder)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("groups", type=parse_group, nargs="+", help="LABEL=FOLDER; the first is the reference")
    parser.add_argument("--docs", "--readme", dest="docs", type=Path, nargs="?", const=DOCS, metavar="FILE",
                        help="replace the block of this page by the table (default docs/studies.md)")
    parser.add_argument("--block", default="seed_curve", help="the page's block name (default seed_curve)")
    parser.add_argument("--seeds", type=int, nargs="+", help="only these seeds (default: every seed<k> folder)")
    args = parser.parse_args(argv)
    groups = dict(args.groups)
    missing = [str(f) for f in groups.values() if not f.is_dir()]
    if missing:
        print(f"error: no run folder {', '.join(missing)}", file=sys.stderr)
        return 2
    block = table(groups, set(args.seeds) if args.seeds else None)
    if args.docs:
        try:
            check_docs_page(args.docs, args.block)  # StudyError: a README, or no such page or block
            start, end = markers(args.block)
            args.docs.write_text(replace_block(args.docs.read_text(), block, args.docs, start, end))
        except StudyError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
