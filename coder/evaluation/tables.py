"""What evaluate.py and train.py print and write: Table-1 rows (the paper's layout), the --compare intervals,
the ECCV Caption rows, and the JSON record."""
from __future__ import annotations

import json
from pathlib import Path


def format_row(result: dict, label: str = "") -> str:
    """One line in the layout of the paper's Table 1: text retrieval R@1/5/10, image retrieval R@1/5/10, R@sum."""
    i2t, t2i = result["i2t"], result["t2i"]
    cells = [i2t["r1"], i2t["r5"], i2t["r10"], t2i["r1"], t2i["r5"], t2i["r10"], result["rsum"]]
    return f"{label:<14}" + " ".join(f"{c:7.1f}" for c in cells)


TABLE_HEADER = f"{'':<14}" + " ".join(f"{h:>7}" for h in ("i2t@1", "i2t@5", "i2t@10", "t2i@1", "t2i@5", "t2i@10",
                                                             "R@sum"))


def format_table(result: dict) -> str:
    """Table-1 rows: the main protocol row, plus COCO 5K and the branch rows when present."""
    lines = [TABLE_HEADER, format_row(result, "1K (5-fold)" if "folds" in result else "fused" if "instance"
                                      in result else "all")]
    if "5k" in result:
        lines.append(format_row(result["5k"], "5K"))
    if "ensemble" in result:  # never to pass as a single model: every row says what it is
        n = len(result["ensemble"])
        lines = [f"ensemble of {n} (similarities averaged{', 1K rows: 5-fold' if 'folds' in result else ''}): "
                 + ", ".join(result["ensemble"]), TABLE_HEADER, format_row(result, f"ensemble of {n}")]
        if "5k" in result:
            lines.append(format_row(result["5k"], f"ens. of {n} 5K"))
    for branch in ("instance", "concept"):
        if branch in result:
            lines.append(format_row(result[branch], branch + "-only"))
    if "chance_rsum" in result:
        chance = f"chance R@sum {result['chance_rsum']:.1f}"
        if "5k" in result:
            chance += f" (5K: {result['5k']['chance_rsum']:.1f})"
        lines.append(chance + "; ties count against the model")
    if "duplicate_captions" in result:
        lines.append(f"{result['duplicate_captions']} captions are verbatim equal to another image's caption")
    return "\n".join(lines)


def format_comparison(compare: dict, name_a: str, name_b: str) -> str:
    """Δ = a - b per metric with its bootstrap interval, one protocol row after another."""
    lines = [f"Δ = {name_a} - {name_b}: paired bootstrap over the test images ({compare['resamples']} resamples, "
             f"seed {compare['seed']}), {100 * compare['level']:.0f}% percentile intervals (test-set noise only)"]
    for row in ("main", "5k"):
        if row in compare:
            cells = [f"{name.replace('_r', '@')} {c['delta']:+.1f} [{c['low']:+.1f}, {c['high']:+.1f}]"
                     for name, c in compare[row].items()]
            lines.append(f"{'5K' if row == '5k' else 'main'}: " + "; ".join(cells))
    return "\n".join(lines)


def format_eccv(scores: dict) -> str:
    """A few lines: ECCV Caption mAP@R, R-P, R@1 and CxC R@1 per direction."""
    rows = [("ECCV mAP@R", "eccv_map_at_r"), ("ECCV R-P", "eccv_rprecision"), ("ECCV R@1", "eccv_r1"),
            ("CxC R@1", "cxc_r1"), ("CxC R@5", "cxc_r5"), ("CxC R@10", "cxc_r10")]
    lines = [f"{'':<14}{'i2t':>7} {'t2i':>7}"]
    lines += [f"{label:<14}{scores[key]['i2t']:7.1f} {scores[key]['t2i']:7.1f}" for label, key in rows if key in scores]
    return "\n".join(lines)


def write_json(path: Path, obj: dict) -> None:
    """Atomic write: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)
