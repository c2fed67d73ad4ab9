"""Run a seeded study: every entry of a study file x every seed, one train.py run each, then one table of
mean ± std per metric and, against a reference entry, paired differences with 95% t intervals.

    python scripts/study.py studies/demo_table2.yaml [--seeds 0 1 2] [--out runs/study] \
        [--only NAME ...] [--docs [docs/studies.md]] [--table-only]

A study file (YAML) names its entries:

    seeds: [0, 1, 2]
    reference: btr                      # optional: the entry every other is compared with, seed by seed
    page: docs/studies.md               # optional: the page holding the table's block (this is the default)
    runs:
      - name: btr                       # folder name: <out>/<name>/seed<k>
        label: "BTR, triplet (Table 2 #1)"
        config: configs/demo.yaml
        set: [loss.instance=triplet, loss.instance_weight=1.0]   # --set overrides, as on train.py

Runs are sequential (timings stay honest on a small machine) and skipped once finished (their eval_<split>.json exists,
or their record.json holds it), so a killed study continues where it stopped. A finished run's numbers go to its
record.json (scripts/run_record.py), which an archive of records can restore on another machine. The table reports, per
entry, the dev R@sum that selected the checkpoint and the test metrics, as mean ± sample std over seeds; with --docs it
replaces the study's own block in its page (the study file's `page`, default docs/studies.md; `--docs FILE`: in another
page), between `<!-- study:NAME:start -->` and `<!-- study:NAME:end -->` (NAME: the study file's name without .yaml, or
`--block NAME`: a second table of the same study, say over other `--seeds`), so one page holds several studies. Study
tables live in docs/, never in a README: a README.md target is an error (`--readme` is the flag's former name). It
refuses to replace a block with a table of fewer finished runs than the block holds (runs missing on disk), unless
--force.

An entry with `rescore: NAME` trains nothing: it evaluates entry NAME's `model_best.pth` of each seed with its own
`set` (eval or data keys, e.g. `eval.beta=0.9`) through evaluate.py, after the training entries; its dev column
is the training's record (the dev R@sum that selected the checkpoint).

Entries may name a `group` (a tuning grid, the paper's value first): each entry then gets its paired difference of
dev R@sum against the group's first entry, and the entry with the best mean dev R@sum, over the seeds every entry
of the group finished, is marked "chosen on dev". Choices are made on dev only; test is reported beside.

An entry may also name `versus: NAME` (say, the previous row of an ablation table): its paired Δ test R@sum against
that entry, same seeds, with the 95% t interval and the number of pairs, in a column of its own.

With `reference`, each other entry also gets the paired difference of test R@sum against the reference run of
the same seed (same data order): its mean with a 95% Student t interval over the seed pairs, the number of
pairs, and the interval's half-width, the smallest difference those pairs resolve. This is seed noise (how
much training again moves a result); `evaluate.py --compare` measures test-set sampling noise instead.

A study file may state the paper's `claims`, each a contrast of entries that the claim says is positive:

    claims:
      - claim: "#5 full CODER above #1 BTR"
        paper: "+17.2 (520.9 vs 503.7)"     # what the paper shows, for the reader
        metric: test R@sum                   # a column of the table: dev R@sum, test R@sum, i2t R@1, t2i R@1, ...
        contrast: {full: 1, btr: -1}         # per seed: sum of coefficient x metric, over the seeds all finished
        size: 17.2                           # optional: the paper's contrast, placed against the interval

The block then ends with one row per claim: the contrast's mean with its 95% t interval over the seeds, their
number, its standard error, and the verdict: "confirmed" when the interval lies above 0, "contradicted" when it
lies below, "unresolved" otherwise (or with fewer than 2 seeds); "provisional" while fewer seeds than those
tabulated (the study's list, or --seeds) have finished every entry of the claim. With `size`, a last cell says
whether the paper's contrast lies inside the interval or above / below it: an "unresolved" sign can still rule
out the paper's size. Differences of differences (Fig. 3: does M-DCL shrink the fall from batch 128 to 32?) are
contrasts with four entries. A contrast may name `group:NAME` for the entry of tuning group NAME chosen on dev
(methods compared each tuned alike: `{group:dcl: 1, group:triplet: -1}`); the claim's cell then names the choices,
and where the choice is the very entry the claim compares it with, the verdict says so instead of "unresolved".

A study file may list `diagnostics`: TensorBoard scalars of the training runs that say why a claim holds or fails
(the diversity values of Eq. 3, each loss term, the gradient norms). A table of its own under the claims gives,
per trained entry, each scalar's mean over the last epoch's logged steps of a run, as mean ± std over the seeds:

    diagnostics:
      - {tag: diversity/diversity_v_mean, label: "div_v mean"}
      - {tag: loss/memory, label: "L_M-DCL"}    # a tag a run did not log (no banks) reads "–"
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml
from results_table import replace_block  # scripts/ is on sys.path when a script runs
from run_record import RECORD
from run_record import build as build_record
from run_record import read as read_record
from run_record import write as write_file

from coder.checkpoint import upgrade_config
from coder.config import ConfigError, load_config
from coder.stats import paired_t_interval
from coder.step import check_config

REPO = Path(__file__).resolve().parents[1]
DOCS = "docs/studies.md"  # the page of a study file that names none (its `page`, relative to the repository)
# (column, how to read it from eval_<split>.json)
COLUMNS = (
    ("dev R@sum", lambda r: r.get("best_dev_rsum")),
    ("test R@sum", lambda r: r["rsum"]),
    ("i2t R@1", lambda r: r["i2t"]["r1"]),
    ("t2i R@1", lambda r: r["t2i"]["r1"]),
    ("instance-only", lambda r: r["instance"]["rsum"] if "instance" in r else None),
    ("concept-only", lambda r: r["concept"]["rsum"] if "concept" in r else None),
    # paired within each run (same model, same test split): what fusing the concept branch adds
    ("fused − instance", lambda r: r["rsum"] - r["instance"]["rsum"] if "instance" in r else None),
    ("beta", lambda r: r["beta"] if "concept" in r else None),  # the fusion weight chosen on dev
)


def markers(name: str) -> tuple[str, str]:
    """The block of docs/studies.md that study `name` owns."""
    return f"<!-- study:{name}:start -->", f"<!-- study:{name}:end -->"


class StudyError(ValueError):
    """The study file is malformed; the message names the entry and key."""


def load_study(path: Path) -> dict:
    try:
        study = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise StudyError(f"cannot read study file {path}: {err}") from err
    if not isinstance(study, dict) or not isinstance(study.get("runs"), list) or not study["runs"]:
        raise StudyError(f"{path}: expected a mapping with a non-empty 'runs' list")
    names = set()
    for i, run in enumerate(study["runs"]):
        for key in ("name",) + (() if isinstance(run, dict) and "rescore" in run else ("config",)):
            if not isinstance(run, dict) or not isinstance(run.get(key), str):
                raise StudyError(f"{path}: runs[{i}] needs a string '{key}'")
        if run["name"] in names:
            raise StudyError(f"{path}: run name '{run['name']}' appears twice")
        names.add(run["name"])
        if not isinstance(run.setdefault("set", []), list):
            raise StudyError(f"{path}: runs[{i}] ('{run['name']}') 'set' must be a list of key=value")
        run.setdefault("label", run["name"])
        if not isinstance(run.setdefault("group", None), (str, type(None))):
            raise StudyError(f"{path}: runs[{i}] ('{run['name']}') 'group' must be a string")
    trained = {run["name"] for run in study["runs"] if "rescore" not in run}
    for i, run in enumerate(study["runs"]):  # entries that name another entry
        if "rescore" in run and run["rescore"] not in trained:
            raise StudyError(f"{path}: runs[{i}] ('{run['name']}'): 'rescore: {run['rescore']}' names no trained "
                             f"entry ({', '.join(sorted(trained))})")
        if run.setdefault("versus", None) is not None and run["versus"] not in names:
            raise StudyError(f"{path}: runs[{i}] ('{run['name']}'): 'versus: {run['versus']}' names no entry")
    check_claims(study, path, names)
    check_diagnostics(study, path)
    study.setdefault("seeds", [0])
    if not isinstance(study.setdefault("page", DOCS), str):
        raise StudyError(f"{path}: 'page' must be a path relative to the repository, e.g. {DOCS}")
    reference = study.setdefault("reference", None)
    if reference is not None and reference not in names:
        raise StudyError(f"{path}: 'reference: {reference}' names no entry of 'runs' ({', '.join(sorted(names))})")
    return study


def check_configs(study: dict, path: Path) -> None:
    """Resolve every entry's config with its overrides before anything trains, so a mistyped key stops the
    study at once instead of after the runs before it."""
    for i, run in enumerate(study["runs"]):
        if "rescore" in run:
            continue  # evaluate.py checks its overrides against the checkpoint's config
        try:
            check_config(load_config(REPO / run["config"], run["set"], upgrade=upgrade_config))
        except ConfigError as err:
            raise StudyError(f"{path}: runs[{i}] ('{run['name']}'): {err}") from err


def check_claims(study: dict, path: Path, names: set[str]) -> None:
    """Each claim names its text, a table column as metric, and a contrast of known entries with number weights."""
    metrics = dict(COLUMNS)
    for i, claim in enumerate(study.setdefault("claims", [])):
        if not isinstance(claim, dict) or not isinstance(claim.get("claim"), str):
            raise StudyError(f"{path}: claims[{i}] needs a string 'claim'")
        if claim.setdefault("metric", "test R@sum") not in metrics:
            raise StudyError(f"{path}: claims[{i}] metric '{claim['metric']}' is not one of {', '.join(metrics)}")
        contrast = claim.get("contrast")
        if not isinstance(contrast, dict) or not contrast or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) for w in contrast.values()):
            raise StudyError(f"{path}: claims[{i}] needs a 'contrast' mapping entries to number weights")
        groups = {f"group:{group}" for group in group_members(study)}
        unknown = sorted(set(contrast) - names - groups)
        if unknown:
            raise StudyError(f"{path}: claims[{i}] contrast names no entry {', '.join(unknown)}"
                             + (f" (groups: {', '.join(sorted(groups))})" if groups else ""))
        claim.setdefault("paper", "")
        size = claim.setdefault("size", None)
        if size is not None and (not isinstance(size, (int, float)) or isinstance(size, bool)):
            raise StudyError(f"{path}: claims[{i}] 'size' must be a number (the paper's contrast), got {size!r}")


def check_diagnostics(study: dict, path: Path) -> None:
    """Each diagnostic names a TensorBoard scalar tag and, optionally, its column label."""
    for i, item in enumerate(study.setdefault("diagnostics", [])):
        if not isinstance(item, dict) or not isinstance(item.get("tag"), str):
            raise StudyError(f"{path}: diagnostics[{i}] needs a string 'tag' (a TensorBoard scalar, e.g. loss/memory)")
        item.setdefault("label", item["tag"])


def run_dir(out: Path, run: dict, seed: int) -> Path:
    return out / run["name"] / f"seed{seed}"


def settings(run: dict) -> dict:
    """What makes an entry's runs what they are: studies that share a runs folder share a run only if these agree."""
    return {key: run.get(key) for key in ("config", "rescore", "set")}


def check_shared(run: dict, folder: Path, record: dict) -> None:
    """Refuse to reuse a finished run (its `record`, {} if none) that another study made under the same name with
    other settings."""
    stored = record.get("settings")
    if stored is not None and stored != settings(run):
        raise StudyError(f"{folder} was made with {stored}, entry '{run['name']}' asks for {settings(run)}: "
                         "rename the entry or pass another --out")


def train(run: dict, seed: int, folder: Path, split: str, stream=None) -> None:
    """One train.py run in a subprocess (resumed if it was killed), or for a `rescore` entry one evaluate.py run
    of the source's checkpoint of this seed; its wall time goes to study_run.json, and what the tables read of
    the finished run to its record.json (scripts/run_record.py)."""
    record = read_record(folder) or {}  # a finished run's, or a restored one's
    check_shared(run, folder, record)
    if split in record.get("eval", {}):
        return  # finished in an earlier invocation, or restored from an archive of records
    if "rescore" in run:
        source = folder.parent.parent / run["rescore"] / f"seed{seed}" / "model_best.pth"
        if not source.is_file():
            raise StudyError(f"{source} is missing: entry '{run['name']}' rescores it (a run restored from an "
                             "archive has its record but no checkpoint; train it again to rescore it)")
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, str(REPO / "evaluate.py"), "--checkpoint", str(source), "--output", str(folder),
                   "--split", split, "--no-progress"]
    else:
        command = [sys.executable, str(REPO / "train.py"), "--config", run["config"], "--output", str(folder),
                   "--no-progress", "--resume", "auto", "--set", f"train.seed={seed}"]
    for override in run["set"]:
        command += ["--set", override]
    print(f"[study] {run['name']} seed {seed}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    tic = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO, stdout=stream, stderr=stream)
    seconds = time.perf_counter() - tic
    # atomically: the other queue may read or archive this folder at any moment
    write_file(folder / "study_run.json", json.dumps({"seconds": seconds, "command": command[1:],
                                                      "settings": settings(run), "commit": commit()}, indent=2))
    write_file(folder / RECORD, json.dumps(build_record(folder, run["name"], seed), indent=1))


def commit() -> str | None:
    """The code's git commit, for a run's record (None outside a git checkout)."""
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    digits = 2 if max(abs(v) for v in values) <= 1 else 1  # a weight like beta, or a recall
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def finished(run: dict, out: Path, seeds: list[int], split: str) -> tuple[dict[int, dict], list[float]]:
    """{seed: eval json} of the seeds whose run finished, and their wall times."""
    return split_results(records(run, out, seeds), split)


def split_results(found: dict[int, dict], split: str) -> tuple[dict[int, dict], list[float]]:
    """{seed: eval json of `split`} of records, and the wall times the records hold."""
    results, seconds = {}, []
    for seed, record in found.items():
        if split in record["eval"]:
            results[seed] = record["eval"][split]
            if record["seconds"] is not None:
                seconds.append(record["seconds"])
    return results, seconds


def records(run: dict, out: Path, seeds) -> dict[int, dict]:
    """{seed: record} of the entry's finished runs (scripts/run_record.py)."""
    found = {seed: read_record(run_dir(out, run, seed)) for seed in seeds}
    return {seed: record for seed, record in found.items() if record is not None}


def interval_text(diff) -> str:
    """'mean [low, high]' of a paired t interval, or the mean alone for a single pair."""
    return f"{diff.mean:.1f}" if diff.half_width is None else f"{diff.mean:.1f} [{diff.low:.1f}, {diff.high:.1f}]"


def paired_cells(results: dict[int, dict], reference: dict[int, dict]) -> list[str]:
    """Δ test R@sum against the reference's run of the same seed [95% t interval], pairs, half-width."""
    seeds = sorted(set(results) & set(reference))
    if not seeds:
        return ["–", "0", "–"]
    diff = paired_t_interval([results[s]["rsum"] for s in seeds], [reference[s]["rsum"] for s in seeds])
    return [interval_text(diff), str(diff.n), "–" if diff.half_width is None else f"{diff.half_width:.1f}"]


def group_members(study: dict) -> dict[str, list[str]]:
    """Each tuning group's entries, in the study file's order (its first: the paper's or the peer's value)."""
    groups: dict[str, list[str]] = {}
    for run in study["runs"]:
        if run["group"]:
            groups.setdefault(run["group"], []).append(run["name"])
    return groups


def chosen_on_dev(members: list[str], done: dict[str, tuple[dict, list]]) -> tuple[str | None, int]:
    """The group's entry with the best mean dev R@sum over the seeds all of its entries finished (None before one
    seed has), and how many seeds those are: an entry with fewer, luckier seeds cannot win on them. Test never
    takes part."""
    dev = {name: {s: r.get("best_dev_rsum") for s, r in done[name][0].items()} for name in members}
    common = sorted(set.intersection(*(set(s for s, v in d.items() if v is not None) for d in dev.values())))
    return (max(members, key=lambda n: statistics.mean(dev[n][s] for s in common)) if common else None), len(common)


def group_cells(study: dict, done: dict[str, tuple[dict, list]]) -> dict[str, list[str]]:
    """Per grouped entry: Δ dev R@sum against its group's first entry [95% t interval over seed pairs], and
    "chosen on dev" (chosen_on_dev)."""
    cells = {}
    for group, members in group_members(study).items():
        dev = {name: {s: r.get("best_dev_rsum") for s, r in done[name][0].items()} for name in members}
        best, _ = chosen_on_dev(members, done)
        first = members[0]
        for name in members:
            seeds = sorted(s for s in dev[name] if dev[name][s] is not None and dev[first].get(s) is not None)
            diff = paired_t_interval([dev[name][s] for s in seeds], [dev[first][s] for s in seeds]) if seeds else None
            delta = f"{first} (first)" if name == first else "–" if diff is None else interval_text(diff)
            cells[name] = [group, delta, "chosen on dev" if name == best else ""]
    return cells


def versus_cell(results: dict[int, dict], other: dict[int, dict], name: str) -> str:
    """'Δ [95% CI] (pairs) vs NAME': test R@sum against entry NAME's run of the same seed."""
    seeds = sorted(set(results) & set(other))
    if not seeds:
        return f"– vs {name}"
    diff = paired_t_interval([results[s]["rsum"] for s in seeds], [other[s]["rsum"] for s in seeds])
    return f"{interval_text(diff)} ({diff.n}) vs {name}"


def best_epoch_cell(results: dict[int, dict], found: dict[int, dict]) -> str:
    """'median [min–max], last k/n': the epochs (from 0) whose dev R@sum selected the checkpoints, and in how many
    runs that was the last epoch trained (the run's saved train.epochs), i.e. dev R@sum was still rising."""
    best = {seed: r["best_epoch"] for seed, r in results.items() if r.get("best_epoch") is not None}
    if not best:
        return "–"
    cell = f"{statistics.median(best.values()):g} [{min(best.values())}–{max(best.values())}]"
    last = [epoch == found[seed]["epochs"] - 1 for seed, epoch in best.items() if found[seed]["epochs"] is not None]
    return cell + (f", last {sum(last)}/{len(last)}" if last else "")


def table(study: dict, out: Path, seeds: list[int], split: str = "test") -> str:
    """Markdown: one row per entry, mean ± std over the seeds whose run finished; with a reference entry,
    the paired columns after test R@sum."""
    ref = study.get("reference")
    names = [name for name, _ in COLUMNS]
    paired = [f"Δ test R@sum vs {ref} [95% CI]", "n pairs", "resolves ±"] if ref else []
    at = names.index("test R@sum") + 1
    found = {run["name"]: records(run, out, seeds) for run in study["runs"]}  # each run folder read once
    done = {name: split_results(records_of, split) for name, records_of in found.items()}
    grouped = group_cells(study, done)
    tuning = ["group", "Δ dev R@sum vs group's first [95% CI]", "choice"] if grouped else []
    steps = ["Δ test R@sum vs `versus` [95% CI] (pairs)"] if any(run["versus"] for run in study["runs"]) else []
    header = ["run", "seeds"] + names[:at] + paired + steps + tuning + names[at:] + ["best epoch", "s / run"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for run in study["runs"]:
        results, seconds = done[run["name"]]
        cells = [mean_std([read(r) for r in results.values()]) for _, read in COLUMNS]
        if ref:
            mine = ["reference", "–", "–"] if run["name"] == ref else paired_cells(results, done[ref][0])
            cells = cells[:at] + mine + cells[at:]
        if steps:
            versus = run["versus"]
            cells.insert(at + len(paired), versus_cell(results, done[versus][0], versus) if versus else "–")
        if grouped:
            at_tuning = at + len(paired) + len(steps)
            cells = cells[:at_tuning] + grouped.get(run["name"], ["–", "–", ""]) + cells[at_tuning:]
        time_cell = f"{statistics.mean(seconds):.0f}" if seconds else "–"
        lines.append(f"| {run['label']} | {len(results)} | " + " | ".join(cells)
                     + f" | {best_epoch_cell(results, found[run['name']])} | {time_cell} |")
    return "\n".join(lines) + "".join("\n\n" + part for part in (
        claims_table(study, done, len(seeds)) if study["claims"] else "",
        diagnostics_table(study, found, done) if study["diagnostics"] else "") if part)


def claims_table(study: dict, done: dict[str, tuple[dict, list]], tabulated: int) -> str:
    """Markdown: each claim's contrast over the seeds every entry of it finished, interval, SE and verdict
    ("provisional" until each of the `tabulated` seeds, the study's list or --seeds, has finished)."""
    lines = ["| claim | paper | metric | contrast, mean [95% CI] | seeds | SE | verdict | paper's size vs CI |",
             "|---|---|---|---:|---:|---:|---|---|"]
    read, groups = dict(COLUMNS), group_members(study)
    labels = {run["name"]: run["label"] for run in study["runs"]}
    for claim in study["claims"]:
        # "group:NAME" stands for the group's entry chosen on dev: methods compared each tuned alike
        choices = {key: chosen_on_dev(groups[key[len("group:"):]], done)
                   for key in claim["contrast"] if key.startswith("group:")}
        chosen = {key: name for key, (name, _) in choices.items()}
        text = claim["claim"] + "".join(f"; {key[len('group:'):]}: {labels[name] if name else 'none chosen yet'}"
                                        for key, name in chosen.items())
        settled = min([n for _, n in choices.values()], default=tabulated)  # seeds each choice was made on
        contrast: dict[str | None, float] = {}
        for key, w in claim["contrast"].items():  # summed: the choice may be an entry the claim also names
            contrast[chosen.get(key, key)] = contrast.get(chosen.get(key, key), 0) + w
        values = {name: {s: read[claim["metric"]](r) for s, r in done[name][0].items()} if name else {}
                  for name in contrast}
        seeds = sorted(set.intersection(*(set(s for s, v in per.items() if v is not None) for per in values.values())))
        contrasts = [sum(w * values[name][s] for name, w in contrast.items()) for s in seeds]
        cells = ["–", "0", "–", "unresolved (no seed finished every entry)", "–"]
        if contrasts:
            diff = paired_t_interval(contrasts, [0.0] * len(contrasts))
            se = None if diff.half_width is None else statistics.stdev(contrasts) / len(contrasts) ** 0.5
            verdict = ("no contrast: dev chose the entry it is compared with" if not any(contrast.values())
                       else "unresolved (one seed)" if diff.half_width is None else "confirmed" if diff.low > 0
                       else "contradicted" if diff.high < 0 else "unresolved")
            if diff.n < tabulated:  # the study is not done: more seeds can still move it
                verdict += f" (provisional: {diff.n} of {tabulated} seeds)"
            elif settled < tabulated:  # a group's choice can still change
                verdict += f" (provisional: chosen on dev over {settled} of {tabulated} seeds)"
            cells = [interval_text(diff), str(diff.n), "–" if se is None else f"{se:.1f}", verdict,
                     size_cell(claim["size"], diff)]
        lines.append(f"| {text} | {claim['paper']} | {claim['metric']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def significant(values: list[float]) -> str:
    """'mean ± std' to three significant digits of the mean (a diversity of 0.967, a loss of 13.7), both at its
    decimals."""
    if not values:
        return "–"
    mean = statistics.mean(values)
    decimals = max(0, 2 - math.floor(math.log10(abs(mean)))) if mean else 3
    spread = f" ± {statistics.stdev(values):.{decimals}f}" if len(values) > 1 else ""
    return f"{mean:.{decimals}f}{spread}"


def diagnostics_table(study: dict, found: dict[str, dict[int, dict]], done: dict[str, tuple[dict, list]]) -> str:
    """Markdown: per trained entry, each diagnostic's last-epoch mean as mean ± std over its finished runs."""
    items = study["diagnostics"]
    lines = ["| run (last epoch, mean over its steps) | seeds | " + " | ".join(i["label"] for i in items) + " |",
             "|---|" + "---:|" * (len(items) + 1)]
    tags = [item["tag"] for item in items]
    for run in study["runs"]:
        if "rescore" in run:
            continue  # no training of its own: its source's row says it
        # each scalar's mean over the last epoch's logged steps of a run (its record's `last_epoch`)
        runs = [found[run["name"]][seed]["last_epoch"] for seed in sorted(done[run["name"]][0])]
        cells = [significant([means[tag] for means in runs if tag in means]) for tag in tags]
        lines.append(f"| {run['label']} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def size_cell(size: float | None, diff) -> str:
    """Where the paper's own contrast lies against this interval: 'inside' (the runs agree with its size),
    'above' or 'below' (they rule out an effect of that size here, whatever the verdict on its sign)."""
    if size is None or diff.half_width is None:
        return "–"
    where = "above" if size > diff.high else "below" if size < diff.low else "inside"
    return f"{size:+g}: {where}"


def finished_runs(block: str) -> int:
    """The finished runs a study table counts: the sum of its 'seeds' column (0 for a block without one); only the
    first table counts (the claims below it are not runs)."""
    first = block.strip().split("\n\n")[0]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in first.splitlines() if line.strip().startswith("|")]
    if not rows or "seeds" not in rows[0]:
        return 0
    column = rows[0].index("seeds")
    return sum(int(row[column]) for row in rows[2:] if len(row) > column and row[column].isdigit())


def check_docs_page(page: Path, name: str) -> None:
    """Study tables are written into docs/ (docs/studies.md), never into a README, and only into a block the
    page already holds; checked before the study trains, so a long study does not fail at its end."""
    if page.name.lower() == "readme.md":
        raise StudyError(f"{page}: study tables are written into docs/studies.md, not into a README "
                         f"(--docs without a file writes there)")
    start, end = markers(name)
    if not page.is_file():
        raise StudyError(f"{page}: no such page for the study:{name} block")
    text = page.read_text()
    if start not in text or end not in text:
        raise StudyError(f"{page} has no '{start}' ... '{end}' block to replace")


def write_docs(page: Path, name: str, block: str, force: bool) -> None:
    """Replace study `name`'s block of the docs page by `block`, refusing (unless forced) to publish fewer
    finished runs than the block holds: a --table-only with runs missing on disk must not erase the table."""
    check_docs_page(page, name)
    start, end = markers(name)
    text = page.read_text()
    held = finished_runs(text.split(start, 1)[1].split(end, 1)[0])
    found = finished_runs(block)
    if found < held and not force:
        raise StudyError(f"{page}: the study:{name} block holds {held} finished runs but only {found} were "
                         f"found; not replaced (--force replaces it anyway)")
    page.write_text(replace_block(text, block, page, start, end))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", type=Path, help="study YAML (see studies/)")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the study's seeds")
    parser.add_argument("--out", type=Path, help="parent folder of the runs (default runs/study, shared by every "
                        "study: an entry of the same name and settings reuses the same runs)")
    parser.add_argument("--only", nargs="+", help="run only these entries (the table still lists all)")
    parser.add_argument("--split", default="test", help="the split whose eval json is tabulated")
    parser.add_argument("--docs", "--readme", dest="docs", type=Path, nargs="?", const=True, metavar="FILE",
                        help="replace the study's block of this page by the table (default: the study file's "
                        f"`page`, else {DOCS})")
    parser.add_argument("--table-only", action="store_true", help="train nothing; tabulate what exists")
    parser.add_argument("--block", help="with --docs: the page's block to replace (default: the study file's name); "
                        "e.g. a second table of the same study over other --seeds")
    parser.add_argument("--force", action="store_true",
                        help="replace the docs block even with fewer finished runs than it holds")
    parser.add_argument("--log", type=Path, help="append the runs' output here (default: inherit)")
    args = parser.parse_args(argv)
    try:
        study = load_study(args.study)
        seeds = args.seeds or study["seeds"]
        block_name = args.block or args.study.stem
        out = args.out or REPO / "runs" / "study"
        page = REPO / study["page"] if args.docs is True else args.docs  # a bare --docs: the study's page
        if page is not None:
            check_docs_page(page, block_name)
        if not args.table_only:
            check_configs(study, args.study)
            stream = args.log.open("a") if args.log else None
            for run in sorted(study["runs"], key=lambda r: "rescore" in r):  # the sources train first
                if args.only and run["name"] not in args.only:
                    continue
                for seed in seeds:
                    train(run, seed, run_dir(out, run, seed), args.split, stream)
        block = table(study, out, seeds, args.split)
        if page is not None:
            write_docs(page, block_name, block, args.force)
    except (ValueError, subprocess.CalledProcessError) as err:  # StudyError, or the page has no such block
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
