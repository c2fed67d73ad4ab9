"""One queue of the study world's runs (docs/study-world.md, "Running the studies"): start one per core.

    python scripts/world_queue.py --seeds 0 2 4 6 8 --tuning-seeds 0 2 4 &
    python scripts/world_queue.py --seeds 1 3 5 7 9 --tuning-seeds 1 3 &
    python scripts/world_queue.py --seeds 1 3 5 7 9 --tuning-seeds 1 3 --plan   # what is left, and how long

Each run is train.py on one thread. The queue first restores the archive of finished runs' records
(scripts/run_record.py), so nothing already made is made again, then goes seed by seed through Table 2, fusion's
rescoring of that seed (it needs #5's checkpoint, which only the machine that trained it holds), Fig. 3 (whose
batch-128 pair with M-DCL is #5) and Fig. 3 at equal steps (why its fall is missing on the world), so that each
seed adds a pair to every claim of the four; then the tuning grid (Table 2 reads its rows at the paper's values:
whether tuned values move them is part of its answer), then Table 3 seed by seed (it reuses Fig. 3's and Table 2's
runs); after each study of each seed it saves the finished runs into the archive, so a machine that stops loses
only the runs in flight (their folders resume where they stopped while the machine lasts). Both queues save into
the same archive, one at a time.
A queue run from a second checkout (say a worktree that keeps the studies' commit while the main one moves on)
needs PYTHONPATH set to it, so that its tables import the same package its runs train with; it says so otherwise.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import statistics
import sys
from pathlib import Path

import run_record
import study

ARCHIVE = study.REPO / "studies" / "records" / "world.jsonl"
FUSION = ["world_fusion_beta_0.9", "world_fusion_beta_1.0"]  # rescorings of #5; the dev-chosen beta is #5 itself


def steps(seeds: list[int], tuning_seeds: list[int]) -> list[tuple[str, int, list[str] | None]]:
    """(study file's name, seed, --only entries) in the order the queue runs them."""
    order = [step for seed in seeds for step in (("world_table2", seed, None), ("world_fusion", seed, FUSION),
                                                 ("world_fig3", seed, None), ("world_fig3_steps", seed, None))]
    order += [("world_tuning", seed, None) for seed in tuning_seeds]
    return order + [("world_table3", seed, None) for seed in seeds]


def plan(out: Path, archived: dict, seeds: list[int], tuning_seeds: list[int]) -> list[tuple[str, int, list[str]]]:
    """(study file's name, seed, the entries it would still run) for each step of the queue: an entry of a seed is
    done when its run finished under `out` or is in the archive's records, and is counted once (studies share
    entries)."""
    done = set(archived)
    todo = []
    for name, seed, only in steps(seeds, tuning_seeds):
        missing = []
        for run in study.load_study(study.REPO / "studies" / f"{name}.yaml")["runs"]:
            key = run["name"], seed
            if (only is None or run["name"] in only) and key not in done:
                done.add(key)
                if run_record.read(study.run_dir(out, run, seed)) is None:
                    missing.append(run["name"])
        todo.append((name, seed, missing))
    return todo


def print_plan(todo: list[tuple[str, int, list[str]]], archived: dict) -> None:
    """The steps with runs left, and the hours they take at the archived runs' mean wall time per entry."""
    times: dict[str, list[float]] = {}
    for (name, _), record in archived.items():
        if record["seconds"] is not None:
            times.setdefault(name, []).append(record["seconds"])
    left = [entry for *_, missing in todo for entry in missing]
    timed = [statistics.mean(times[entry]) for entry in left if entry in times]
    for name, seed, missing in todo:
        if missing:
            print(f"{name} seed {seed}: {len(missing)} to run ({', '.join(missing)})")
    print(f"{len(left)} runs left; the {len(timed)} of entries with a timed run in the archive take about "
          f"{sum(timed) / 3600:.1f} h, the other {len(left) - len(timed)} have no timed run yet")


def package_checkout() -> Path:
    """The checkout whose coder package this process imports (an install may point at another one)."""
    import coder
    return Path(coder.__file__).resolve().parents[1]


def save(out: Path, archive: Path) -> None:
    """The finished runs into the archive, under a lock: the other queue saves into the same file."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "archive.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        run_record.save(out, archive)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", required=True, help="this queue's seeds")
    parser.add_argument("--tuning-seeds", type=int, nargs="*", default=[], help="its seeds of the tuning")
    parser.add_argument("--out", type=Path, default=study.REPO / "runs" / "study", help="the runs' parent folder")
    parser.add_argument("--archive", type=Path, default=ARCHIVE, help="the records' file (default: the repository's)")
    parser.add_argument("--plan", action="store_true", help="print the runs this queue has left, and run none")
    args = parser.parse_args(argv)
    package = package_checkout()
    if package != study.REPO:  # train.py imports its own checkout's package, the tables this one's
        print(f"error: this queue trains with {study.REPO} but imports the coder package of {package}: "
              f"set PYTHONPATH={study.REPO} so that a run and its table are one commit's code", file=sys.stderr)
        return 2
    os.environ["OMP_NUM_THREADS"] = "1"  # each train.py on one core: two queues, two cores, honest timings
    try:
        if args.plan:
            archived = run_record.load_archive(args.archive)
            print_plan(plan(args.out, archived, args.seeds, args.tuning_seeds), archived)
            return 0
        run_record.restore(args.out, args.archive)
        for name, seed, only in steps(args.seeds, args.tuning_seeds):
            command = [str(study.REPO / "studies" / f"{name}.yaml"), "--out", str(args.out), "--seeds", str(seed)]
            code = study.main(command + (["--only", *only] if only else []))
            save(args.out, args.archive)
            if code:
                return code
    except run_record.RecordError as err:  # an archive that holds another run of the same name and seed
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
