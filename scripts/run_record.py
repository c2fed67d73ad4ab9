"""A finished study run's record: every number the study tables, the seed curves and the Fig. 3 picture read from
a run folder, in one small JSON, so that a study outlives the disk its runs were made on.

    python scripts/run_record.py save --out runs/study --archive studies/records/world.jsonl
    python scripts/run_record.py restore --out runs/study --archive studies/records/world.jsonl

A study of the study world takes CPU-days, longer than any one machine may keep its runs. `save` gathers the
records of the finished runs under --out into an archive (one JSON line per run, sorted; about 2 KB each), which
the repository keeps as the evidence behind the studies' pages; `restore` writes each archived record back as
`record.json` into its run folder, which the study runner then counts as a finished run: it trains it no more and
tabulates it as if its folder were whole. A restored run has no checkpoint: an entry that rescores it
(`rescore:`) needs the run's folder itself.

A record holds the run's name and seed, the settings it was made with (the study entry's config, rescore and set),
its wall time (the runner's time of the one train.py it ran; for a run resumed after a kill, whose runner timed only
its last part, the training's time over its processes as train.py logged it, without start-up and the test
evaluation, about 0.5% of a world run; none for a resumed run whose train.py did not log it), the eval_<split>.json of
each split it was evaluated on, its train.epochs, its dev R@sum per epoch and the seconds between consecutive dev
evaluations (the seed curves), and the last-epoch mean of each TensorBoard scalar it logged (the diagnostics).
Archiving a run whose record differs from the archive's is an error: a run is made once.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import sys
from pathlib import Path

import yaml

RECORD = "record.json"
SPLITS = ("dev", "test")
DEV_TAG = "dev/rsum"  # one value per epoch (its step is the epoch, from 0)
TIME_TAG = "time/train_seconds"  # the training's wall time at each epoch's end, carried over a resume


class RecordError(ValueError):
    """An archive or a record that cannot be used as it stands."""


def scalars(folder: Path) -> tuple[dict[str, list[tuple[int, float]]], list[float]]:
    """{tag: [(step, value)]} over all of a run's event files in creation order (a later file's value of a step
    replaces an earlier one's: a resumed run logs again from its checkpoint), and the seconds between consecutive
    dev evaluations within one process (a resume's restart is not an epoch's time)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # only for scalars

    quiet = logging.getLogger("tensorboard")  # it warns of every resume's purge, which is what we want it to do
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    found: dict[str, dict[int, float]] = {}
    durations: list[float] = []
    try:
        for path in sorted(folder.glob("events.out.tfevents.*")):  # names start with the creation time
            events = EventAccumulator(str(path), size_guidance={"scalars": 0})
            events.Reload()
            for tag in events.Tags()["scalars"]:
                points = events.Scalars(tag)
                found.setdefault(tag, {}).update({p.step: p.value for p in points})
                if tag == DEV_TAG:
                    durations += [b.wall_time - a.wall_time for a, b in zip(points, points[1:])]
    finally:
        quiet.setLevel(level)
    return {tag: sorted(steps.items()) for tag, steps in found.items()}, durations


def last_epoch_means(points: dict[str, list], epochs: int) -> dict[str, float]:
    """{tag: mean over the last epoch's logged steps}: the last 1/epochs of the tag's steps."""
    means = {}
    for tag, series in points.items():
        if tag not in (DEV_TAG, TIME_TAG) and series:
            start = series[-1][0] * (epochs - 1) / epochs
            last = [value for step, value in series if step > start]
            means[tag] = statistics.mean(last or [series[-1][1]])  # a tag logged once, at step 0: that value
    return means


def build(folder: Path, name: str, seed: int) -> dict | None:
    """The record of the run in `folder`, made from its files; None while it has no eval json (unfinished)."""
    evals = {split: json.loads((folder / f"eval_{split}.json").read_text()) for split in SPLITS
             if (folder / f"eval_{split}.json").is_file()}
    if not evals:
        return None
    study_run = folder / "study_run.json"
    timing = json.loads(study_run.read_text()) if study_run.is_file() else {}
    config = folder / "config.yaml"  # a rescoring run has none: it trains nothing
    epochs = yaml.safe_load(config.read_text())["train"]["epochs"] if config.is_file() else None
    points, durations = scalars(folder)
    processes = len(list(folder.glob("events.out.tfevents.*")))  # each start of train.py opens one
    # the runner times its last invocation only: a run resumed after a kill took longer than that
    clock = points.get(TIME_TAG)
    seconds = timing.get("seconds") if processes <= 1 else clock[-1][1] if clock else None
    return {"name": name, "seed": seed, "settings": timing.get("settings"), "seconds": seconds,
            "commit": timing.get("commit"), "eval": evals, "epochs": epochs,
            "dev_rsum": {str(step + 1): value for step, value in points.get(DEV_TAG, [])},
            "epoch_seconds": durations,
            "last_epoch": last_epoch_means(points, epochs) if epochs else {}}


def read(folder: Path) -> dict | None:
    """A run folder's record: its record.json (written when it finished, or restored from an archive), else made
    from its files; None while the run is unfinished."""
    stored = folder / RECORD
    if stored.is_file():
        return json.loads(stored.read_text())
    match = re.fullmatch(r"seed(\d+)", folder.name)
    return build(folder, folder.parent.name, int(match.group(1)) if match else -1) if folder.is_dir() else None


def write(path: Path, text: str) -> None:
    """Atomically: a killed save leaves the old file, never half of a new one (a name of its own per process: two
    queues may restore the same record at once)."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def load_archive(path: Path) -> dict[tuple[str, int], dict]:
    records = {}
    for number, line in enumerate(path.read_text().splitlines() if path.is_file() else [], 1):
        try:
            record = json.loads(line)
            records[record["name"], record["seed"]] = record
        except (ValueError, KeyError, TypeError) as err:
            raise RecordError(f"{path}:{number}: not a run record ({err})") from None
    return records


def save(out: Path, archive: Path) -> int:
    """Add the finished runs under `out` to the archive; returns how many were new. A run counts once the runner
    is done with it (its record.json, or its study_run.json for a run made before records): a train.py that has
    just written its eval json while the other queue saves is not archived half-described."""
    records = load_archive(archive)
    added = 0
    for folder in sorted(out.glob("*/seed*")):
        done = (folder / RECORD).is_file() or (folder / "study_run.json").is_file()
        record = read(folder) if done else None
        if record is None:
            continue
        key = record["name"], record["seed"]
        if key in records and records[key] != record:
            raise RecordError(f"{folder}: its record differs from {archive}'s run of the same name and seed")
        added += key not in records
        records[key] = record
    archive.parent.mkdir(parents=True, exist_ok=True)
    write(archive, "".join(json.dumps(records[key], sort_keys=True) + "\n" for key in sorted(records)))
    return added


def restore(out: Path, archive: Path) -> int:
    """Write each archived record into its run folder that holds no finished run; returns how many."""
    restored = 0
    for (name, seed), record in load_archive(archive).items():
        folder = out / name / f"seed{seed}"
        if read(folder) is None:
            folder.mkdir(parents=True, exist_ok=True)
            write(folder / RECORD, json.dumps(record, indent=1))
            restored += 1
    return restored


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("save", "restore"))
    parser.add_argument("--out", type=Path, required=True, help="parent folder of the runs (the runner's --out)")
    parser.add_argument("--archive", type=Path, required=True, help="the JSON-lines file of records")
    args = parser.parse_args(argv)
    try:
        count = (save if args.action == "save" else restore)(args.out, args.archive)
    except RecordError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.action}: {count} run(s) {'added to' if args.action == 'save' else 'restored from'} {args.archive}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
