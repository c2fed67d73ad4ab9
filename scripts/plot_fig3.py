"""CODER Fig. 3 as a picture: R@1 against mini-batch size, with and without M-DCL, from a study's finished runs.

    python scripts/plot_fig3.py [--study studies/world_fig3.yaml] [--out runs/study] [--svg docs/study_world_fig3.svg]

Each entry of the study is one point: its batch size (`train.batch_size` of its resolved config) and whether it
trains with M-DCL (Eq. 6: momentum banks and `loss.memory_weight` > 0). The point is the mean R@1 over the seeds
whose run finished, with the 95% Student t interval of that mean as its error bar (cut at 100, where R@1 stops);
the two lines sit a little apart at each batch size so that neither's bars hide the other's. Image retrieval (t2i,
the paper's first number) and text retrieval (i2t) are drawn side by side, as Fig. 3's two panels. The paired
differences (w against w/o M-DCL, same seed) are in the study's table (`scripts/study.py ... --docs`).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from study import StudyError, finished, load_study  # scripts/ is on sys.path when a script runs

from coder.config import load_config
from coder.stats import paired_t_interval
from coder.tools.svg import Series, document, panel

COLOURS = {True: "#1f77b4", False: "#ff7f0e"}
LEGEND = {True: "w M-DCL", False: "w/o M-DCL"}
PANELS = (("t2i", "image retrieval (t2i) R@1"), ("i2t", "text retrieval (i2t) R@1"))
DODGE = {True: -0.04, False: 0.04}  # log2 units: the two lines' error bars at one batch size side by side


def mean_interval(values: list[float]) -> tuple[float, float | None]:
    """The mean and the half-width of its 95% t interval (None from one value): the runner's paired interval
    against zero, which is the one-sample interval of the values."""
    interval = paired_t_interval(values, [0.0] * len(values))
    return interval.mean, interval.half_width


def points(study: dict, out: Path, split: str = "test") -> dict[bool, dict[int, dict[str, tuple]]]:
    """{with M-DCL: {batch size: {"t2i"/"i2t": (mean R@1, half-width, seeds)}}} over the entries with runs."""
    found: dict[bool, dict[int, dict[str, tuple]]] = {True: {}, False: {}}
    for run in study["runs"]:
        cfg = load_config(run["config"], run["set"])
        with_mdcl = cfg["model"]["momentum"]["enabled"] and cfg["loss"]["memory_weight"] > 0
        results, _ = finished(run, out, study["seeds"], split)
        if results:
            found[with_mdcl][cfg["train"]["batch_size"]] = {
                side: (*mean_interval([r[side]["r1"] for r in results.values()]), len(results))
                for side, _ in PANELS}
    return found


def draw(found: dict[bool, dict[int, dict[str, tuple]]], path: Path) -> None:
    """Two panels (t2i, i2t), x the batch size on a log2 axis, one line per M-DCL setting with its error bars."""
    sizes = sorted({b for by_batch in found.values() for b in by_batch})
    if not sizes:
        raise StudyError("no finished runs to draw")
    ticks = [(math.log2(b), str(b)) for b in sizes]
    parts = []
    for i, (side, title) in enumerate(PANELS):
        series = []
        for with_mdcl, by_batch in found.items():
            batches = sorted(by_batch)
            if batches:
                n = min(by_batch[b][side][2] for b in batches)
                series.append(Series([(math.log2(b) + DODGE[with_mdcl], by_batch[b][side][0]) for b in batches],
                                     COLOURS[with_mdcl],
                                     f"{LEGEND[with_mdcl]} ({n}+ seeds)", [by_batch[b][side][1] for b in batches]))
        parts += panel(series, x_label="mini-batch size", y_label="R@1 (%)", title=title, x_ticks=ticks,
                       origin=(480 * i, 0), y_max=100.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(document(parts, 960, 300))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, default=Path("studies/world_fig3.yaml"))
    parser.add_argument("--out", type=Path, default=Path("runs/study"), help="parent folder of the study's runs")
    parser.add_argument("--svg", type=Path, default=Path("docs/study_world_fig3.svg"))
    parser.add_argument("--split", default="test")
    args = parser.parse_args(argv)
    try:
        study = load_study(args.study)
        found = points(study, args.out, args.split)
        draw(found, args.svg)
    except StudyError as err:
        sys.exit(f"error: {err}")
    for with_mdcl, by_batch in found.items():
        for batch in sorted(by_batch):
            cells = ", ".join(f"{side} R@1 {m:.1f}" + (f" ± {h:.1f}" if h is not None else "") + f" ({n} seeds)"
                              for side, (m, h, n) in by_batch[batch].items())
            print(f"{LEGEND[with_mdcl]}, batch {batch}: {cells}")
    print(f"wrote {args.svg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
