"""scripts/study.py: runs configs x seeds (really, through train.py), skips finished runs, and tabulates
mean ± std from the runs' eval json."""
import json
import re
import statistics
import sys
from pathlib import Path

import pytest
import yaml

import evaluate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import study  # noqa: E402


def write_study(path: Path, data_root: Path, bert: str) -> Path:
    common = [f"data.root={data_root}", f"model.text_encoder={bert}", "model.region_dim=16",
              "model.embed_dim=16", "train.batch_size=8", "train.epochs=1", "train.max_steps_per_epoch=2",
              "train.device=cpu", "eval.batch_size=20"]
    path.write_text(json.dumps({"seeds": [0, 1], "runs": [
        {"name": "triplet", "label": "triplet baseline", "config": "configs/baselines/f30k_vse.yaml",
         "set": common},
        {"name": "dcl", "config": "configs/ablations/table2_row2_dcl.yaml",
         "set": common + ["loss.dcl_positive=unscaled"]},
    ]}))
    return path


def test_study_runs_every_seed_and_tabulates(tiny_coder_data, tiny_bert_dir, tmp_path, capsys):
    spec = write_study(tmp_path / "tiny_study.yaml", tiny_coder_data, tiny_bert_dir)
    page = tmp_path / "studies.md"
    start, end = study.markers("tiny_study")
    page.write_text(f"intro\n{start}\nold\n{end}\nrest\n")
    out = tmp_path / "runs"
    assert study.main([str(spec), "--out", str(out), "--docs", str(page), "--log", str(tmp_path / "log")]) == 0
    results = {name: [json.loads((out / name / f"seed{s}" / "eval_test.json").read_text()) for s in (0, 1)]
               for name in ("triplet", "dcl")}
    for name, runs in results.items():
        stored = [yaml.safe_load((out / name / f"seed{s}" / "config.yaml").read_text())["train"]["seed"]
                  for s in (0, 1)]
        assert stored == [0, 1], f"{name}: seeds were not passed to train.py"
        record = json.loads((out / name / "seed1" / "record.json").read_text())  # what an archive keeps
        assert record["eval"]["test"] == runs[1] and record["name"] == name and record["seed"] == 1
        assert len(record["dev_rsum"]) == 1 and record["seconds"] > 0 and len(record["commit"] or "0" * 40) == 40
    table = capsys.readouterr().out
    rsums = [r["rsum"] for r in results["triplet"]]
    expected = f"{statistics.mean(rsums):.1f} ± {statistics.stdev(rsums):.1f}"
    line = next(row for row in table.splitlines() if row.startswith("| triplet baseline |"))
    assert f"| {expected} |" in line and line.split("|")[2].strip() == "2"
    text = page.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "old" not in text and "triplet baseline" in text

    # a second invocation trains nothing: finished runs are kept as they are
    stamp = (out / "dcl" / "seed1" / "eval_test.json").stat().st_mtime_ns
    assert study.main([str(spec), "--out", str(out)]) == 0
    assert (out / "dcl" / "seed1" / "eval_test.json").stat().st_mtime_ns == stamp

    # rescoring a run with evaluate.py keeps training's record, so the dev column still counts both seeds
    folder = out / "triplet" / "seed1"
    assert evaluate.main(["--checkpoint", str(folder / "model_best.pth"), "--device", "cpu", "--no-progress"]) == 0
    rescored = json.loads((folder / "eval_test.json").read_text())
    trained = results["triplet"][1]
    assert (rescored["best_epoch"], rescored["best_dev_rsum"]) == (trained["best_epoch"], trained["best_dev_rsum"])
    capsys.readouterr()
    assert study.main([str(spec), "--out", str(out), "--table-only"]) == 0
    header, _, *rows = capsys.readouterr().out.strip().splitlines()
    row = next(r for r in rows if r.startswith("| triplet baseline |"))
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")]))
    devs = [r["best_dev_rsum"] for r in results["triplet"]]
    assert cells["dev R@sum"] == f"{statistics.mean(devs):.1f} ± {statistics.stdev(devs):.1f}"

    # a rescore entry evaluates the triplet's checkpoints again (settings that cannot change the ranking): the
    # same test R@sum, so Δ = 0 with a zero-width interval against them, and nothing is trained again
    spec_data = json.loads(spec.read_text())
    spec_data["reference"] = "triplet"
    spec_data["runs"].append({"name": "again", "rescore": "triplet", "set": ["eval.batch_size=7"]})
    spec.write_text(json.dumps(spec_data))
    assert study.main([str(spec), "--out", str(out)]) == 0
    assert (out / "dcl" / "seed1" / "eval_test.json").stat().st_mtime_ns == stamp
    again = [json.loads((out / "again" / f"seed{s}" / "eval_test.json").read_text()) for s in (0, 1)]
    assert [r["rsum"] for r in again] == [r["rsum"] for r in results["triplet"]]
    row = next(r for r in capsys.readouterr().out.splitlines() if r.startswith("| again |"))
    assert "| 0.0 [0.0, 0.0] | 2 | 0.0 |" in row
    spec_data["runs"].append({"name": "orphan", "rescore": "nowhere"})
    spec.write_text(json.dumps(spec_data))
    with pytest.raises(study.StudyError, match="'rescore: nowhere' names no trained entry"):
        study.load_study(spec)


def test_study_file_errors_name_the_entry(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"runs": [{"name": "a", "config": "x.yaml"}, {"name": "a", "config": "y.yaml"}]}))
    with pytest.raises(study.StudyError, match="'a' appears twice"):
        study.load_study(bad)
    bad.write_text(json.dumps({"runs": [{"name": "a"}]}))
    with pytest.raises(study.StudyError, match=r"runs\[0\] needs a string 'config'"):
        study.load_study(bad)


@pytest.mark.parametrize("path", sorted((study.REPO / "studies").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_study_files_resolve(path):
    study.check_configs(study.load_study(path), path)


@pytest.mark.parametrize("typo,key", [("train.grad_clip_scop=all", "train.grad_clip_scop"),
                                      ("loss.instance=hinge", "loss.instance")])  # a name a registry owns
def test_a_mistyped_override_stops_the_study_before_any_run(tmp_path, capsys, typo, key):
    bad = tmp_path / "typo.yaml"
    bad.write_text(json.dumps({"runs": [
        # were it started, this entry would fail at once (no data there) rather than train for minutes
        {"name": "fine", "config": "configs/demo.yaml", "set": [f"data.root={tmp_path / 'none'}", "data.prepare="]},
        {"name": "typo", "config": "configs/demo.yaml", "set": [typo]}]}))
    assert study.main([str(bad), "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "runs[1] ('typo')" in err and key in err
    assert not (tmp_path / "runs").exists()  # the valid entry before it did not start either


def test_table_pairs_fused_with_instance_and_each_study_owns_its_block(tmp_path):
    """The paired column is fused minus instance-only inside each run; two studies fill one page without
    touching each other's block."""
    def result(rsum, instance):
        recalls = {"r1": 1.0}
        return {"rsum": rsum, "i2t": recalls, "t2i": recalls, "instance": {"rsum": instance},
                "concept": {"rsum": 5.0}, "beta": 0.98}

    out = tmp_path / "runs"
    for seed, (fused, instance) in enumerate(((401.0, 402.0), (410.0, 407.0))):
        folder = out / "full" / f"seed{seed}"
        folder.mkdir(parents=True)
        (folder / "eval_test.json").write_text(json.dumps(result(fused, instance)))
    spec = tmp_path / "paired.yaml"
    spec.write_text(json.dumps({"seeds": [0, 1], "runs": [{"name": "full", "config": "configs/demo.yaml"}]}))
    other_start, other_end = study.markers("other")
    start, end = study.markers("paired")
    page = tmp_path / "studies.md"
    page.write_text(f"{other_start}\nkeep\n{other_end}\n{start}\nold\n{end}\n")
    assert study.main([str(spec), "--out", str(out), "--docs", str(page), "--table-only"]) == 0
    header, _, row = page.read_text().split(start)[1].split(end)[0].strip().splitlines()
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")]))
    differences = [-1.0, 3.0]
    assert cells["fused − instance"] == f"{statistics.mean(differences):.1f} ± {statistics.stdev(differences):.1f}"
    assert f"{other_start}\nkeep\n{other_end}" in page.read_text()


def test_paired_columns_against_the_reference_entry(tmp_path):
    """Δ test R@sum against the reference run of the same seed, by hand: mean ± t_{0.975, 2} sd / √3 over the
    three seed pairs; a seed the reference lacks is not paired; an entry equal to the reference gives 0 ± 0;
    the unpaired seed std of each row stays."""
    rsums = {"ref": [440.0, 451.0, 430.0], "same": [440.0, 451.0, 430.0], "new": [452.0, 450.0, 441.0, 470.0]}
    out = tmp_path / "runs"
    for name, values in rsums.items():
        for seed, rsum in enumerate(values):
            folder = out / name / f"seed{seed}"
            folder.mkdir(parents=True)
            (folder / "eval_test.json").write_text(json.dumps({"rsum": rsum, "i2t": {"r1": 1.0}, "t2i": {"r1": 1.0}}))
    spec = tmp_path / "ref.yaml"
    spec.write_text(json.dumps({"seeds": [0, 1, 2, 3], "reference": "ref", "runs": [
        {"name": name, "config": "configs/demo.yaml"} for name in rsums]}))
    assert study.main([str(spec), "--out", str(out), "--table-only"]) == 0
    lines = study.table(study.load_study(spec), out, [0, 1, 2, 3]).splitlines()
    rows = {line.split("|")[1].strip(): dict(zip([c.strip() for c in lines[0].split("|")], [c.strip() for c in
            line.split("|")])) for line in lines[2:]}
    diffs = [12.0, -1.0, 11.0]
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    half = 4.302652729911275 * sd / 3 ** 0.5
    column = "Δ test R@sum vs ref [95% CI]"
    assert rows["new"][column] == f"{mean:.1f} [{mean - half:.1f}, {mean + half:.1f}]"
    assert rows["new"]["n pairs"] == "3" and rows["new"]["resolves ±"] == f"{half:.1f}"
    assert rows["new"]["test R@sum"] == f"{statistics.mean(rsums['new']):.1f} ± {statistics.stdev(rsums['new']):.1f}"
    assert rows["same"][column] == "0.0 [0.0, 0.0]" and rows["same"]["resolves ±"] == "0.0"
    assert rows["ref"][column] == "reference"
    # `versus`: the same paired interval against a named entry, in its own column (here the reference again)
    spec.write_text(json.dumps({"seeds": [0, 1, 2, 3], "runs": [
        {"name": name, "config": "configs/demo.yaml", **({"versus": "ref"} if name == "new" else {})}
        for name in rsums]}))
    lines = study.table(study.load_study(spec), out, [0, 1, 2, 3]).splitlines()
    cells = dict(zip([c.strip() for c in lines[0].split("|")], [c.strip() for c in lines[4].split("|")]))
    expected = f"{mean:.1f} [{mean - half:.1f}, {mean + half:.1f}] (3) vs ref"
    assert cells["Δ test R@sum vs `versus` [95% CI] (pairs)"] == expected
    spec.write_text(json.dumps({"reference": "nope", "runs": [{"name": "a", "config": "configs/demo.yaml"}]}))
    with pytest.raises(study.StudyError, match="'reference: nope' names no entry"):
        study.load_study(spec)
    spec.write_text(json.dumps({"runs": [{"name": "a", "config": "configs/demo.yaml", "versus": "b"}]}))
    with pytest.raises(study.StudyError, match="'versus: b' names no entry"):
        study.load_study(spec)


def test_docs_block_is_not_replaced_by_fewer_finished_runs(tmp_path, capsys):
    """--table-only with runs missing on disk refuses to erase the published block; --force replaces it."""
    out = tmp_path / "runs"
    for seed in (0, 1):
        folder = out / "full" / f"seed{seed}"
        folder.mkdir(parents=True)
        recalls = {"r1": 1.0}
        (folder / "eval_test.json").write_text(json.dumps({"rsum": 400.0 + seed, "i2t": recalls, "t2i": recalls}))
    spec = tmp_path / "guarded.yaml"
    spec.write_text(json.dumps({"seeds": [0, 1, 2], "runs": [{"name": "full", "config": "configs/demo.yaml"}]}))
    start, end = study.markers("guarded")
    page = tmp_path / "studies.md"
    published = ("| run | seeds | dev R@sum |\n|---|---:|---:|\n| full | 3 | 401.0 ± 1.0 |\n"
                 "| other | 2 | 400.0 ± 0.0 |")
    page.write_text(f"{start}\n{published}\n{end}\n")
    argv = [str(spec), "--out", str(out), "--docs", str(page), "--table-only"]
    assert study.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds 5 finished runs but only 2 were found" in err, err
    assert published in page.read_text()  # untouched
    assert study.main(argv + ["--force"]) == 0
    assert "| full | 2 |" in page.read_text() and published not in page.read_text()
    assert study.main(argv) == 0  # as many runs as the block now holds: replaced again


def write_dev_test(out: Path, runs: dict[str, list[tuple[float, float]]]) -> None:
    """Finished runs out/NAME/seed<k> whose k-th (dev R@sum that chose the checkpoint, test R@sum) is given."""
    for name, values in runs.items():
        for seed, (dev, test) in enumerate(values):
            folder = out / name / f"seed{seed}"
            folder.mkdir(parents=True)
            (folder / "eval_test.json").write_text(json.dumps(
                {"rsum": test, "best_dev_rsum": dev, "i2t": {"r1": 1.0}, "t2i": {"r1": 1.0}}))


def test_tuning_groups_choose_on_dev_over_common_seeds(tmp_path):
    """Within a group the best mean dev R@sum over the seeds every member finished is chosen, never the best
    test; Δ dev against the group's first entry is paired by seed (by hand: mean ± t_{0.975, 1} sd / √2)."""
    runs = {  # name: [(dev, test) per seed]
        "paper": [(400.0, 500.0), (410.0, 520.0)],
        "low": [(405.0, 700.0), (412.0, 710.0), (300.0, 300.0)],  # the best test; seed 2 is not common
        "high": [(399.0, 600.0), (420.0, 610.0)],  # over seeds 0-1, the best dev mean
    }
    out = tmp_path / "runs"
    write_dev_test(out, runs)
    spec = tmp_path / "tune.yaml"
    spec.write_text(json.dumps({"seeds": [0, 1, 2], "runs": [
        {"name": name, "group": "g", "config": "configs/demo.yaml"} for name in runs]
        + [{"name": "alone", "config": "configs/demo.yaml"}]}))
    lines = study.table(study.load_study(spec), out, [0, 1, 2]).splitlines()
    header = [c.strip() for c in lines[0].split("|")]
    rows = {line.split("|")[1].strip(): dict(zip(header, [c.strip() for c in line.split("|")])) for line in lines[2:]}
    # dev means over seeds 0-1: paper 405.0, low 408.5, high 409.5 -> high, although low's 3-seed mean differs
    assert [name for name, row in rows.items() if row["choice"] == "chosen on dev"] == ["high"]
    column = "Δ dev R@sum vs group's first [95% CI]"
    diffs = [-1.0, 10.0]
    mean, half = statistics.mean(diffs), 12.706204736174707 * statistics.stdev(diffs) / 2 ** 0.5
    assert rows["high"][column] == f"{mean:.1f} [{mean - half:.1f}, {mean + half:.1f}]"
    assert rows["paper"][column] == "paper (first)" and rows["alone"]["group"] == "–"
    spec.write_text(json.dumps({"runs": [{"name": "a", "group": 3, "config": "configs/demo.yaml"}]}))
    with pytest.raises(study.StudyError, match="'group' must be a string"):
        study.load_study(spec)


def test_a_shared_run_made_with_other_settings_is_not_reused(tmp_path, capsys):
    """Studies share runs/study: a finished run is reused only by an entry of the same config and overrides."""
    folder = tmp_path / "runs" / "row" / "seed0"
    folder.mkdir(parents=True)
    (folder / "eval_test.json").write_text(json.dumps({"rsum": 400.0, "i2t": {"r1": 1.0}, "t2i": {"r1": 1.0}}))
    made = {"name": "row", "config": "configs/demo.yaml", "set": ["loss.mu=0.05"]}
    (folder / "study_run.json").write_text(json.dumps({"seconds": 1.0, "settings": study.settings(made)}))
    spec = tmp_path / "s.yaml"
    spec.write_text(json.dumps({"runs": [{**made, "label": "same settings, another label"}]}))
    assert study.main([str(spec), "--out", str(tmp_path / "runs")]) == 0  # reused: nothing is trained
    spec.write_text(json.dumps({"runs": [{**made, "set": ["loss.mu=0.2"]}]}))
    assert study.main([str(spec), "--out", str(tmp_path / "runs")]) == 2
    assert "entry 'row' asks for" in capsys.readouterr().err


def test_an_entry_with_fewer_luckier_seeds_is_not_chosen_on_dev(tmp_path):
    """'chosen on dev' compares the entries over the seeds every one of them finished: 'many' beats 'few' on
    seeds 0-1 (410 against 405); over its own seeds 'many' averages 403.3 for its unlucky seed 2, which 'few'
    never ran, and would lose."""
    runs = {"many": [410.0, 410.0, 390.0], "few": [405.0, 405.0]}
    out = tmp_path / "runs"
    write_dev_test(out, {name: [(dev, 500.0) for dev in devs] for name, devs in runs.items()})
    spec = tmp_path / "tune.yaml"
    spec.write_text(json.dumps({"seeds": [0, 1, 2], "runs": [
        {"name": name, "group": "g", "config": "configs/demo.yaml"} for name in runs]}))
    lines = study.table(study.load_study(spec), out, [0, 1, 2]).splitlines()
    header = [c.strip() for c in lines[0].split("|")]
    rows = {line.split("|")[1].strip(): dict(zip(header, [c.strip() for c in line.split("|")])) for line in lines[2:]}
    assert [name for name, row in rows.items() if row["choice"] == "chosen on dev"] == ["many"]
    assert rows["few"]["seeds"] == "2" and rows["many"]["seeds"] == "3"
    assert rows["few"]["Δ dev R@sum vs group's first [95% CI]"] == "-5.0 [-5.0, -5.0]"  # paired on seeds 0-1


def test_study_tables_go_into_docs_never_into_a_readme(tmp_path, capsys):
    """--docs alone names the study file's page, docs/studies.md when it names none; a README (also by the former
    flag --readme) is refused, and a page
    without the study's block is refused before anything trains or is checked (the entry's unknown key would be
    the error otherwise, so a check moved after training fails here in seconds)."""
    spec = tmp_path / "nosuch_study.yaml"
    spec.write_text(json.dumps({"seeds": [0], "runs": [{"name": "full", "config": "configs/demo.yaml",
                                                        "set": ["train.no_such_key=1"]}]}))
    out = tmp_path / "runs"
    page = Path(study.__file__).resolve().parents[1] / "docs" / "studies.md"
    before = page.read_text()
    assert study.main([str(spec), "--out", str(out), "--docs"]) == 2
    err = capsys.readouterr().err
    assert f"{page} has no '<!-- study:nosuch_study:start -->'" in err, err
    assert not out.exists() and page.read_text() == before  # nothing trained, nothing written
    # a study file's `page` is where --docs alone writes (here one without the block: refused the same way)
    spec.write_text(json.dumps({"seeds": [0], "page": "docs/gpu.md", "runs": [
        {"name": "full", "config": "configs/demo.yaml", "set": ["train.no_such_key=1"]}]}))
    assert study.main([str(spec), "--out", str(out), "--docs"]) == 2
    assert f"{page.parent / 'gpu.md'} has no '<!-- study:nosuch_study:start -->'" in capsys.readouterr().err

    start, end = study.markers("nosuch_study")
    readme = tmp_path / "README.md"
    readme.write_text(f"{start}\nold\n{end}\n")
    for flag in ("--docs", "--readme"):
        assert study.main([str(spec), "--out", str(out), flag, str(readme)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "written into docs/studies.md, not into a README" in err, err
        assert not out.exists() and readme.read_text() == f"{start}\nold\n{end}\n"


def test_fig3_picture_plots_mean_r1_with_t_intervals_per_batch_and_mdcl(tmp_path, capsys):
    """scripts/plot_fig3.py: each entry is a point at its resolved batch size, in the w or w/o M-DCL line by its
    config, the mean R@1 of its finished seeds with the 95% t half-width t_{0.975, n-1} sd / √n as error bar;
    an entry without finished runs is left out."""
    import plot_fig3
    r1 = {"w128": [60.0, 62.0, 64.0], "wo128": [58.0, 59.0, 60.0], "w32": [61.0, 61.0, 61.0], "wo32": []}
    sets = {"w128": [], "wo128": ["loss.memory_weight=0.0"], "w32": ["train.batch_size=32"],
            "wo32": ["train.batch_size=32", "loss.memory_weight=0.0"]}
    out = tmp_path / "runs"
    for name, values in r1.items():
        for seed, value in enumerate(values):
            folder = out / name / f"seed{seed}"
            folder.mkdir(parents=True)
            (folder / "eval_test.json").write_text(json.dumps({"rsum": 500.0, "i2t": {"r1": value + 20},
                                                               "t2i": {"r1": value}}))
    spec = tmp_path / "fig3.yaml"
    spec.write_text(json.dumps({"seeds": [0, 1, 2], "runs": [
        {"name": name, "config": "configs/demo.yaml", "set": sets[name]} for name in r1]}))
    found = plot_fig3.points(study.load_study(spec), out)
    half = 4.302652729911275 * 2.0 / 3 ** 0.5  # sd of (60, 62, 64) is 2
    assert found[True][128]["t2i"] == (62.0, pytest.approx(half), 3)
    assert found[True][128]["i2t"][0] == 82.0
    assert found[False][128]["t2i"] == (59.0, pytest.approx(half / 2), 3)
    assert found[True][32]["t2i"] == (61.0, 0.0, 3) and 32 not in found[False]
    svg = tmp_path / "fig3.svg"
    assert plot_fig3.main(["--study", str(spec), "--out", str(out), "--svg", str(svg)]) == 0
    text = svg.read_text()
    assert text.count("<polyline") == 4  # two lines in each of the two panels
    assert text.count("<path") == 4  # error bars of the three-seed points with spread: w128, wo128 in two panels
    assert "w M-DCL, batch 128: t2i R@1 62.0 ±" in capsys.readouterr().out
    bars = [float(x) + 4 for x in re.findall(r'<path d="M([0-9.]+),', text)]  # each bar's x: w128, wo128 per panel
    assert bars[0] < bars[1] and bars[2] < bars[3], "w and w/o M-DCL's bars at batch 128 drawn over each other"


def test_a_chart_capped_at_100_cuts_the_error_bars_there():
    """An interval of a mean R@1 may pass 100 (two seeds: t_{0.975, 1} = 12.7); with y_max the axis stops at
    100 and the bar is cut at the axis's top rather than drawn into the title."""
    from coder.tools.svg import Series, panel
    series = [Series([(5.0, 95.0), (7.0, 90.0)], "black", "w", [12.0, 1.0])]
    capped = "\n".join(panel(series, x_label="b", y_label="R@1", y_max=100.0))
    ticks = [float(v) for v in re.findall(r'text-anchor="end">([0-9.]+)<', capped)]
    assert max(ticks) == 100.0
    top = min(float(v) for v in re.findall(r'<path d="M[0-9.]+,([0-9.]+)h8', capped))
    assert top == 48.0  # the panel's top edge (its padding), where 100 is drawn
    free = "\n".join(panel(series, x_label="b", y_label="R@1"))
    assert max(float(v) for v in re.findall(r'text-anchor="end">([0-9.]+)<', free)) > 100.0


def test_best_epoch_column_counts_runs_still_rising_at_their_last_epoch(tmp_path):
    """The 'best epoch' cell: median [min–max] of the selected epochs, and how many were the last epoch trained
    (train.epochs - 1 of each run's saved config): a run whose dev R@sum was still rising when it stopped."""
    out = tmp_path / "runs"
    for seed, (best, epochs) in enumerate([(11, 12), (9, 12), (11, 12), (5, 6)]):
        folder = out / "a" / f"seed{seed}"
        folder.mkdir(parents=True)
        (folder / "eval_test.json").write_text(json.dumps({"rsum": 500.0, "best_epoch": best, "i2t": {"r1": 1.0},
                                                           "t2i": {"r1": 1.0}}))
        (folder / "config.yaml").write_text(yaml.safe_dump({"train": {"epochs": epochs}}))
    spec = tmp_path / "s.yaml"
    spec.write_text(json.dumps({"seeds": [0, 1, 2, 3], "runs": [{"name": "a", "config": "configs/demo.yaml"}]}))
    lines = study.table(study.load_study(spec), out, [0, 1, 2, 3]).splitlines()
    cells = dict(zip([c.strip() for c in lines[0].split("|")], [c.strip() for c in lines[2].split("|")]))
    assert cells["best epoch"] == "10 [5–11], last 3/4"


def test_claims_are_contrasts_over_common_seeds_with_a_verdict(tmp_path):
    """A claim's row: per seed, the contrast sum(w x metric) over the seeds every entry of it finished; mean ± the
    95% t half-width, SE = sd / √n, and the verdict by the interval's side of 0; a fifth seed one entry lacks is
    left out; the finished-runs count of the block ignores the claims' table."""
    r1 = {"w128": [62.0, 63.0, 61.0, 62.0, 70.0], "w32": [61.0, 62.5, 60.0, 61.5],
          "wo128": [61.0, 62.0, 60.0, 61.0], "wo32": [58.0, 59.5, 57.0, 58.0]}
    out = tmp_path / "runs"
    for name, values in r1.items():
        for seed, value in enumerate(values):
            folder = out / name / f"seed{seed}"
            folder.mkdir(parents=True)
            (folder / "eval_test.json").write_text(json.dumps({"rsum": 500.0 + value, "i2t": {"r1": value},
                                                               "t2i": {"r1": value}}))
    claims = [{"claim": "M-DCL shrinks the fall", "paper": "2.6 vs 0.9", "metric": "t2i R@1",
               "contrast": {"w32": 1, "w128": -1, "wo32": -1, "wo128": 1}},
              {"claim": "w/o M-DCL rises at batch 32", "metric": "t2i R@1", "contrast": {"wo32": 1, "wo128": -1}},
              {"claim": "batch 128 w against w/o", "metric": "test R@sum", "contrast": {"w128": 1, "wo128": -1}},
              {"claim": "w at 32 above w/o at 128", "metric": "i2t R@1", "contrast": {"w32": 1, "wo128": -1}}]
    spec = tmp_path / "c.yaml"
    spec.write_text(json.dumps({"seeds": [0, 1, 2, 3, 4], "claims": claims, "runs": [
        {"name": name, "config": "configs/demo.yaml"} for name in r1]}))
    block = study.table(study.load_study(spec), out, [0, 1, 2, 3, 4])
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in block.split("\n\n")[1].splitlines()[2:]}
    shrink = [2.0, 2.0, 2.0, 2.5]  # (w32 - w128) - (wo32 - wo128) per seed 0-3
    mean, sd = statistics.mean(shrink), statistics.stdev(shrink)
    half = 3.182446305284263 * sd / 2  # t_{0.975, 3}, n = 4
    assert rows["M-DCL shrinks the fall"] == ["2.6 vs 0.9", "t2i R@1", f"{mean:.1f} [{mean - half:.1f}, "
                                              f"{mean + half:.1f}]", "4", f"{sd / 2:.1f}",
                                              "confirmed (provisional: 4 of 5 seeds)", "–"]
    assert rows["w/o M-DCL rises at batch 32"][-2].startswith("contradicted (provisional")
    assert rows["batch 128 w against w/o"][-2].startswith("confirmed") and rows["batch 128 w against w/o"][3] == "4"
    assert rows["w at 32 above w/o at 128"][-2].startswith("unresolved (")  # 0, 0.5, 0, 0.5: the interval holds 0
    spec.write_text(json.dumps({"seeds": [0, 1, 2, 3], "claims": claims[2:3], "runs": [
        {"name": name, "config": "configs/demo.yaml"} for name in r1]}))
    done = study.table(study.load_study(spec), out, [0, 1, 2, 3]).split("\n\n")[1].splitlines()[2]
    assert done.endswith("| confirmed | – |")  # every seed of the study's list: no longer provisional
    assert study.finished_runs(block) == 5 + 4 + 4 + 4
    spec.write_text(json.dumps({"claims": [{"claim": "x", "contrast": {"nope": 1}}],
                                "runs": [{"name": "a", "config": "configs/demo.yaml"}]}))
    with pytest.raises(study.StudyError, match=r"claims\[0\] contrast names no entry nope"):
        study.load_study(spec)


def test_a_claim_on_tuning_groups_compares_the_entries_chosen_on_dev(tmp_path):
    """`group:NAME` in a contrast is the group's entry with the best mean dev R@sum, never the best test: methods
    compared each tuned alike. The claim's cell names the choices; a choice the claim also names outright sums
    its weights (here to 0 on every seed); a group with no common seed yet chooses nothing."""
    runs = {  # name: [(dev, test) per seed]
        "m02": [(560.0, 560.0), (562.0, 561.0), (561.0, 559.0)],
        "m01": [(559.0, 590.0), (560.0, 591.0), (559.0, 589.0)],  # the best test, never chosen for it
        "dcl_paper": [(558.0, 555.0), (559.0, 556.0), (557.0, 552.0)],
        "dcl_mu": [(561.0, 557.0), (563.0, 559.0), (562.0, 556.0)],
        "uto": [(550.0, 550.0)], "uto_alpha": [], "m04": [(500.0, 600.0), (501.0, 600.0)],
    }
    out = tmp_path / "runs"
    write_dev_test(out, runs)
    groups = {"m02": "triplet", "m01": "triplet", "dcl_paper": "dcl", "dcl_mu": "dcl", "uto": "uto",
              "uto_alpha": "uto", "m04": "triplet"}  # m04 has 2 of the 3 seeds: the triplet's choice may change
    claims = [{"claim": "DCL tuned above the triplet tuned", "contrast": {"group:dcl": 1, "group:triplet": -1}},
              {"claim": "tuning moves DCL", "contrast": {"group:dcl": 1, "dcl_mu": -1}},
              {"claim": "UTO tuned above the triplet tuned", "contrast": {"group:uto": 1, "group:triplet": -1}}]
    spec = tmp_path / "tune.yaml"
    spec.write_text(json.dumps({"seeds": [0, 1, 2], "claims": claims, "runs": [
        {"name": name, "label": f"label {name}", "group": group, "config": "configs/demo.yaml"}
        for name, group in groups.items()]}))
    block = study.table(study.load_study(spec), out, [0, 1, 2]).split("\n\n")[1].splitlines()[2:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in block]
    # dev chooses m02 (561.0 against 559.5 over seeds 0-1) and dcl_mu (562.0 against 558.0); test: dcl_mu - m02
    # = -3, -2, -3 over all 3 seeds, provisional while the triplet's choice rests on 2
    diffs = [-3.0, -2.0, -3.0]
    mean, half = statistics.mean(diffs), 4.302652729911275 * statistics.stdev(diffs) / 3 ** 0.5
    assert rows[0][0] == "DCL tuned above the triplet tuned; dcl: label dcl_mu; triplet: label m02"
    assert rows[0][3:7] == [f"{mean:.1f} [{mean - half:.1f}, {mean + half:.1f}]", "3",
                            f"{statistics.stdev(diffs) / 3 ** 0.5:.1f}",
                            "contradicted (provisional: chosen on dev over 2 of 3 seeds)"]
    assert rows[1][3:5] == ["0.0 [0.0, 0.0]", "3"]  # chosen dcl_mu minus dcl_mu: said so, not "unresolved"
    assert rows[1][6] == "no contrast: dev chose the entry it is compared with"
    assert rows[2][0].endswith("uto: none chosen yet; triplet: label m02") and rows[2][4] == "0"
    spec.write_text(json.dumps({"claims": [{"claim": "x", "contrast": {"group:nope": 1}}],
                                "runs": [{"name": "a", "group": "g", "config": "configs/demo.yaml"}]}))
    with pytest.raises(study.StudyError, match=r"contrast names no entry group:nope \(groups: group:g\)"):
        study.load_study(spec)


def write_rsums(out: Path, values: dict[str, list[float]]) -> None:
    """Finished runs out/NAME/seed<k> whose test R@sum is 500 + the k-th value."""
    for name, per_seed in values.items():
        for seed, value in enumerate(per_seed):
            folder = out / name / f"seed{seed}"
            folder.mkdir(parents=True)
            (folder / "eval_test.json").write_text(json.dumps({"rsum": 500.0 + value, "i2t": {"r1": 1.0},
                                                               "t2i": {"r1": 1.0}}))


def test_a_claim_places_the_papers_size_against_its_interval(tmp_path):
    """With `size`, the claims' last cell says where the paper's contrast lies: inside the interval, or above /
    below it (ruled out here, even when the sign is unresolved); without one, or with one seed, '–'."""
    out = tmp_path / "runs"
    write_rsums(out, {"a": [1.0, 2.0, 1.5, 1.2], "b": [0.0, 0.0, 0.0, 0.0]})
    contrast = {"a": 1, "b": -1}  # 1.0, 2.0, 1.5, 1.2: mean 1.425, 95% CI about [0.74, 2.11]
    claims = [{"claim": f"size {size}", "contrast": contrast, "size": size} for size in (1.8, 3.0, 0.5)]
    spec = tmp_path / "c.yaml"
    spec.write_text(json.dumps({"seeds": [0, 1, 2, 3], "claims": claims + [{"claim": "none", "contrast": contrast}],
                                "runs": [{"name": n, "config": "configs/demo.yaml"} for n in ("a", "b")]}))
    rows = {line.split("|")[1].strip(): line.split("|")[-2].strip()
            for line in study.table(study.load_study(spec), out, [0, 1, 2, 3]).split("\n\n")[1].splitlines()[2:]}
    assert rows == {"size 1.8": "+1.8: inside", "size 3.0": "+3: above", "size 0.5": "+0.5: below", "none": "–"}
    spec.write_text(json.dumps({"claims": [{"claim": "x", "contrast": contrast, "size": "+1.8"}],
                                "runs": [{"name": n, "config": "configs/demo.yaml"} for n in ("a", "b")]}))
    with pytest.raises(study.StudyError, match=r"claims\[0\] 'size' must be a number"):
        study.load_study(spec)


def test_diagnostics_are_last_epoch_means_of_the_runs_tensorboard_scalars(tmp_path):
    """The diagnostics table: per trained entry, each tag's mean over the last 1/epochs of its logged steps (the
    last epoch), as mean ± std over the seeds at three significant digits; the steps a resumed run's second event
    file purges and logs again count once; a tag a run never logged reads '–'; a rescore entry has no row."""
    from torch.utils.tensorboard import SummaryWriter

    out = tmp_path / "runs"
    for seed, shift in enumerate([0.0, 0.02]):
        folder = out / "a" / f"seed{seed}"
        folder.mkdir(parents=True)
        (folder / "eval_test.json").write_text(json.dumps({"rsum": 500.0, "i2t": {"r1": 1.0}, "t2i": {"r1": 1.0}}))
        (folder / "config.yaml").write_text(yaml.safe_dump({"train": {"epochs": 2}}))
        first = SummaryWriter(str(folder))
        for step in range(1, 9):  # killed after step 8; the resume purges from step 7 on and logs 7-10 again
            first.add_scalar("diversity/diversity_v_mean", 0.5, step)
            first.add_scalar("loss/pgc", 100.0, step)
        first.close()
        second = SummaryWriter(str(folder), purge_step=7)
        for step in range(7, 11):
            second.add_scalar("diversity/diversity_v_mean", 0.9 + shift + step / 1000, step)
            second.add_scalar("loss/pgc", 13.0 + step / 10, step)
        second.close()
    spec = tmp_path / "d.yaml"
    spec.write_text(json.dumps({"seeds": [0, 1], "diagnostics": [
        {"tag": "diversity/diversity_v_mean", "label": "div_v"}, {"tag": "loss/pgc"}, {"tag": "loss/memory"}],
        "runs": [{"name": "a", "label": "full", "config": "configs/demo.yaml"},
                 {"name": "r", "rescore": "a", "set": ["eval.beta=0.9"]}]}))
    block = study.table(study.load_study(spec), out, [0, 1])
    lines = block.split("\n\n")[-1].splitlines()
    assert lines[0] == "| run (last epoch, mean over its steps) | seeds | div_v | loss/pgc | loss/memory |"
    # steps 6-10 (the last of 2 epochs of 10 steps): 6 from the first file, 7-10 from the resume's
    last_epoch = [(0.5 + 0.907 + 0.908 + 0.909 + 0.910) / 5, (100.0 + 13.7 + 13.8 + 13.9 + 14.0) / 5]
    div = [last_epoch[0], last_epoch[0] + 0.02 * 4 / 5]
    pgc = last_epoch[1]
    assert lines[2:] == [f"| full | 2 | {statistics.mean(div):.3f} ± {statistics.stdev(div):.3f} | "
                         f"{pgc:.1f} ± 0.0 | – |"]


def test_a_second_block_of_the_same_study_over_other_seeds(tmp_path):
    """--block NAME writes the table into another block of the page (the study's own block stays as it was), and a
    claim is provisional against the seeds tabulated (--seeds), not the study's whole list."""
    out = tmp_path / "runs"
    write_rsums(out, {"a": [3.0, 2.0, 2.5, 90.0], "b": [0.0, 0.0, 0.0, 0.0]})
    spec = tmp_path / "s.yaml"
    spec.write_text(json.dumps({"seeds": [0, 1, 2, 3, 4], "runs": [
        {"name": n, "config": "configs/demo.yaml"} for n in ("a", "b")],
        "claims": [{"claim": "a above b", "contrast": {"a": 1, "b": -1}}]}))
    page = tmp_path / "page.md"
    own, other = study.markers("s"), study.markers("s_without_3")
    page.write_text(f"{own[0]}\nkept\n{own[1]}\n{other[0]}\nold\n{other[1]}\n")
    assert study.main([str(spec), "--out", str(out), "--table-only", "--seeds", "0", "1", "2",
                       "--docs", str(page), "--block", "s_without_3"]) == 0
    text = page.read_text()
    assert f"{own[0]}\nkept\n{own[1]}" in text
    block = text.split(other[0])[1].split(other[1])[0]
    assert "| a above b |  | test R@sum | 2.5 [1.3, 3.7] | 3 | 0.3 | confirmed | – |" in block  # all 3 of 3
    assert study.main([str(spec), "--out", str(out), "--table-only", "--docs", str(page)]) == 0
    assert "unresolved (provisional: 4 of 5 seeds)" in page.read_text().split(own[0])[1].split(own[1])[0]
