"""scripts/seed_curve.py: per-epoch seed mean ± std from TensorBoard dev/rsum and paired Δ ± SE, checked against a
direct computation on fake run folders."""
import json
import math
import sys
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import seed_curve  # noqa: E402

# group -> seed -> dev R@sum per epoch; group -> seed -> test R@sum
DEV = {"a": {0: [300.0, 350.0, 371.0], 1: [310.0, 342.5, 380.0], 2: [290.0, 361.0, 360.0]},
       "b": {0: [305.0, 349.0, 390.0], 1: [300.0, 352.0, 384.0], 2: [280.0, 371.5, 377.0], 3: [1.0, 2.0, 3.0]}}
TEST = {"a": {0: 366.0, 1: 377.0, 2: 361.0}, "b": {0: 388.0, 1: 379.5, 2: 373.0, 3: 9.0}}


def write_events(folder: Path, name: str, values: dict[int, float], start: float) -> None:
    """One process's event file: dev/rsum at the given 0-based epochs, one every 40 s from `start`."""
    scratch = folder / f"writer{name}"
    writer = SummaryWriter(str(scratch))
    for k, (epoch, value) in enumerate(sorted(values.items())):
        writer.add_scalar("dev/rsum", value, epoch, walltime=start + 40.0 * k)
    writer.close()
    (created,) = scratch.iterdir()
    created.rename(folder / f"events.out.tfevents.{name}")  # real names start with the creation time: same order
    scratch.rmdir()


def write_run(folder: Path, dev: list[float], test: float, resumed: bool) -> None:
    folder.mkdir(parents=True)
    if resumed:  # killed after logging epoch 2 with a value its checkpoint did not keep, resumed 1,000 s later
        write_events(folder, "01", {0: dev[0], 1: -1000.0}, start=100.0)
        write_events(folder, "02", {1: dev[1], 2: dev[2]}, start=1100.0)
    else:
        write_events(folder, "01", dict(enumerate(dev)), start=100.0)
    (folder / "eval_test.json").write_text(json.dumps({"rsum": test}))


def fake_runs(root: Path) -> dict[str, Path]:
    for group, seeds in DEV.items():
        for seed, dev in seeds.items():
            write_run(root / group / f"seed{seed}", dev, TEST[group][seed], resumed=seed == 1)
    return {g: root / g for g in DEV}


def direct_mean_std(values):
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def test_table_matches_direct_computation(tmp_path):
    lines = seed_curve.table(fake_runs(tmp_path)).splitlines()
    rows = {line.split(" | ")[0].strip("| "): line.strip("|").split(" | ")
            for line in lines[2:] if line.startswith("|")}
    assert set(rows) == {"1", "2", "3", "test (best dev)"}
    for key, row in rows.items():
        def pick(group, seed):
            return TEST[group][seed] if key == "test (best dev)" else DEV[group][seed][int(key) - 1]
        for column, group in ((1, "a"), (2, "b")):
            mean, std = direct_mean_std([pick(group, s) for s in DEV[group]])
            assert row[column].strip() == f"{mean:.1f} ± {std:.1f} ({len(DEV[group])})"
        deltas = [pick("b", s) - pick("a", s) for s in (0, 1, 2)]  # seed 3 has no partner in group a
        mean, std = direct_mean_std(deltas)
        assert row[3].strip() == f"{mean:+.1f} ± {std / math.sqrt(3):.1f} (3)"
    assert "s / epoch (median, training + dev evaluation): a 40, b 40" in lines[-1]


def test_epoch_seconds_stay_inside_one_process(tmp_path):
    write_run(tmp_path / "seed1", DEV["a"][1], TEST["a"][1], resumed=True)
    scores, seconds = seed_curve.read_run(tmp_path / "seed1")
    assert scores == {1: DEV["a"][1][0], 2: DEV["a"][1][1], 3: DEV["a"][1][2], "test": TEST["a"][1]}
    assert seconds == [40.0, 40.0]  # not the 1,000 s restart between the two files


def test_docs_block_replaced_and_missing_folder_is_an_error(tmp_path, capsys):
    groups = fake_runs(tmp_path / "runs")
    page = tmp_path / "studies.md"
    page.write_text("intro\n<!-- study:curve:start -->\nold\n<!-- study:curve:end -->\nrest\n")
    args = [f"{g}={f}" for g, f in groups.items()]
    assert seed_curve.main(args + ["--docs", str(page), "--block", "curve"]) == 0
    text = page.read_text()
    assert "old" not in text and seed_curve.table(groups) in text and text.endswith("rest\n")
    readme = tmp_path / "README.md"  # study tables live in docs/, never in a README
    readme.write_text("<!-- study:curve:start -->\nold\n<!-- study:curve:end -->\n")
    assert seed_curve.main(args + ["--readme", str(readme), "--block", "curve"]) == 2
    assert "not into a README" in capsys.readouterr().err and "old" in readme.read_text()
    assert seed_curve.main(["a=" + str(tmp_path / "nowhere")]) == 2
    assert "no run folder" in capsys.readouterr().err


def test_seeds_restrict_every_group_and_their_pairs(tmp_path):
    """--seeds: only those seed folders count, in the means and in the pairs (seed 3 of b, a far outlier, gone)."""
    lines = seed_curve.table(fake_runs(tmp_path), {0, 2, 3}).splitlines()
    row = next(line for line in lines if line.startswith("| test (best dev) |")).strip("|").split(" | ")
    a, b = [TEST["a"][s] for s in (0, 2)], [TEST["b"][s] for s in (0, 2, 3)]
    assert row[1].strip() == "{:.1f} ± {:.1f} (2)".format(*direct_mean_std(a))
    assert row[2].strip() == "{:.1f} ± {:.1f} (3)".format(*direct_mean_std(b))
    deltas = [TEST["b"][s] - TEST["a"][s] for s in (0, 2)]
    mean, std = direct_mean_std(deltas)
    assert row[3].strip() == f"{mean:+.1f} ± {std / math.sqrt(2):.1f} (2)"
