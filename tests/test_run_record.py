"""scripts/run_record.py: a finished run's record carries every number the study tables and seed curves read, so
that runs archived on one machine and restored on another (their folders gone) tabulate exactly as before, are
not trained again, and are never silently replaced."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import run_record  # noqa: E402
import seed_curve  # noqa: E402
import study  # noqa: E402

ENTRY = {"name": "full", "label": "full CODER", "config": "configs/demo.yaml", "set": ["loss.mu=0.1"]}
BASE = {"name": "base", "label": "triplet", "config": "configs/demo.yaml", "set": ["loss.instance=triplet"]}


def write_run(folder: Path, entry: dict, seed: int, resumed: bool, clocked: bool = False) -> None:
    """A finished run as train.py and the runner leave it: eval json, saved config, wall time, and two event files
    when it was killed after epoch 2 and resumed from its epoch-1 checkpoint (epoch 2 logged twice). `clocked`:
    train.py logged the training's wall time at each epoch's end, 50 s an epoch, the resume's count continuing
    from its checkpoint's (the killed process's epoch 2 is lost: 40 s into it)."""
    folder.mkdir(parents=True)
    shift = 10.0 * seed + (5.0 if entry is ENTRY else 0.0)
    recalls = {"r1": 70.0 + shift / 10, "r5": 90.0, "r10": 95.0}
    (folder / "eval_test.json").write_text(json.dumps({"rsum": 500.0 + shift, "i2t": recalls, "t2i": recalls,
                                                       "best_epoch": 1 + seed % 2, "best_dev_rsum": 510.0 + shift}))
    (folder / "config.yaml").write_text(yaml.safe_dump({"train": {"epochs": 3, "seed": seed}}))
    (folder / "study_run.json").write_text(json.dumps({"seconds": 60.0 + seed, "settings": study.settings(entry)}))
    for part, (epochs, start) in enumerate([((0, 1), 100.0), ((1, 2), 900.0)] if resumed else [((0, 1, 2), 100.0)]):
        scratch = folder / f"writer{part}"
        writer = SummaryWriter(str(scratch))
        for k, epoch in enumerate(epochs):
            writer.add_scalar("dev/rsum", 400.0 + shift + 10 * epoch + part, epoch, walltime=start + 30.0 * k)
            if clocked:
                lost = 40.0 if part == 0 and epoch == 1 else 0.0
                writer.add_scalar("time/train_seconds", 50.0 * (epoch + 1) + lost, epoch, walltime=start + 30.0 * k)
            for step in range(4 * epoch + 1, 4 * epoch + 5):
                writer.add_scalar("loss/pgc", 20.0 - step - part + shift, step, walltime=start + 30.0 * k)
        writer.close()
        (created,) = scratch.iterdir()
        created.rename(folder / f"events.out.tfevents.{part}")  # real names start with the creation time: in order
        scratch.rmdir()


def make_study(tmp_path: Path) -> tuple[dict, Path]:
    spec = tmp_path / "s.yaml"
    spec.write_text(json.dumps({
        "seeds": [0, 1, 2], "reference": "base", "runs": [BASE, ENTRY],
        "claims": [{"claim": "full above base", "paper": "+1", "metric": "test R@sum",
                    "contrast": {"full": 1, "base": -1}}],
        "diagnostics": [{"tag": "loss/pgc", "label": "L_PGC"}]}))
    out = tmp_path / "runs"
    for entry in (BASE, ENTRY):
        for seed in (0, 1, 2):
            write_run(out / entry["name"] / f"seed{seed}", entry, seed, resumed=seed == 1)
    return study.load_study(spec), out


def tables(spec: dict, out: Path) -> tuple[str, str]:
    return study.table(spec, out, [0, 1, 2]), seed_curve.table({"base": out / "base", "full": out / "full"})


def test_restored_records_tabulate_as_the_run_folders_did(tmp_path):
    """Study table (paired columns, claims, best epoch, wall time, diagnostics) and seed curves, from the folders
    and then from an archive restored onto a machine that never had them: the same text."""
    spec, out = make_study(tmp_path)
    before = tables(spec, out)
    assert "| full CODER | 3 |" in before[0] and "L_PGC" in before[0] and "last 1/3" in before[0]
    archive = tmp_path / "records" / "world.jsonl"
    assert run_record.main(["save", "--out", str(out), "--archive", str(archive)]) == 0
    assert len(archive.read_text().splitlines()) == 6
    assert run_record.save(out, archive) == 0  # saving again adds nothing and changes nothing
    shutil.rmtree(out)
    elsewhere = tmp_path / "elsewhere"
    assert run_record.restore(elsewhere, archive) == 6
    assert sorted(p.name for p in (elsewhere / "full" / "seed1").iterdir()) == ["record.json"]
    assert tables(spec, elsewhere) == before


def test_the_record_reads_a_resumed_runs_events_once_per_step(tmp_path):
    """Epoch 2 (step 1) of the resumed run is the second process's value; the last epoch's mean of a scalar is over
    steps 9-12 of its 12, the resume's; the seconds between dev evaluations never span the restart, and the run's
    wall time, which the runner measured over its last process only, is left out."""
    folder = tmp_path / "full" / "seed1"
    write_run(folder, ENTRY, 1, resumed=True)
    record = run_record.read(folder)
    assert record["dev_rsum"] == {"1": 415.0, "2": 426.0, "3": 436.0}
    assert record["epoch_seconds"] == [30.0, 30.0]
    assert record["last_epoch"]["loss/pgc"] == pytest.approx(sum(20.0 - s - 1 + 15.0 for s in range(9, 13)) / 4)
    assert record["epochs"] == 3 and record["settings"] == study.settings(ENTRY)
    assert record["seconds"] is None  # the runner timed its last part only: no wall time rather than a short one
    whole = tmp_path / "full" / "seed2"
    write_run(whole, ENTRY, 2, resumed=False)
    assert run_record.read(whole)["seconds"] == 62.0
    clocked = tmp_path / "full" / "seed3"
    write_run(clocked, ENTRY, 3, resumed=True, clocked=True)
    record = run_record.read(clocked)
    assert record["seconds"] == 150.0  # its last epoch's count: 3 epochs of 50 s, the killed epoch's 40 s not in it
    assert "time/train_seconds" not in record["last_epoch"]  # a clock, not a diagnostic


def test_an_archive_never_replaces_a_run_with_another(tmp_path, capsys):
    spec, out = make_study(tmp_path)
    archive = tmp_path / "world.jsonl"
    run_record.save(out, archive)
    result = out / "full" / "seed2" / "eval_test.json"
    result.write_text(result.read_text().replace("525.0", "526.0"))  # the same run made again, another number
    assert run_record.main(["save", "--out", str(out), "--archive", str(archive)]) == 2
    assert "full/seed2: its record differs from" in capsys.readouterr().err
    assert run_record.restore(out, archive) == 0  # a folder holding a finished run keeps it
    assert json.loads(result.read_text())["rsum"] == 526.0
    finishing = out / "full" / "seed3"  # train.py has written its eval json; the runner has not yet timed it
    write_run(finishing, ENTRY, 3, resumed=False)
    (finishing / "study_run.json").unlink()
    result.write_text(result.read_text().replace("526.0", "525.0"))
    assert run_record.save(out, archive) == 0 and ("full", 3) not in run_record.load_archive(archive)
    archive.write_text(archive.read_text() + "not json\n")
    assert run_record.main(["restore", "--out", str(tmp_path / "x"), "--archive", str(archive)]) == 2
    assert f"{archive}:7: not a run record" in capsys.readouterr().err


def test_a_restored_run_is_not_trained_again_and_cannot_be_rescored(tmp_path, monkeypatch, capsys):
    """The runner counts a restored record as finished (no train.py); an entry rescoring it needs its checkpoint,
    which the record does not carry: a one-line error naming the file."""
    spec, out = make_study(tmp_path)
    archive = tmp_path / "world.jsonl"
    run_record.save(out, archive)
    shutil.rmtree(out)
    run_record.restore(out, archive)

    def no_run(*args, **kwargs):
        raise AssertionError(f"a restored run was run again: {args}")

    monkeypatch.setattr(study.subprocess, "run", no_run)
    path = tmp_path / "s.yaml"
    assert study.main([str(path), "--out", str(out)]) == 0
    capsys.readouterr()
    rescore = {"name": "fused", "rescore": "full", "set": ["eval.beta=0.9"]}
    path.write_text(json.dumps({"seeds": [0], "runs": [ENTRY, rescore]}))
    assert study.main([str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "full/seed0/model_best.pth is missing: entry 'fused' rescores it" in err
    spec_other = {**ENTRY, "set": ["loss.mu=0.2"]}  # a restored record keeps its settings: no reuse under others
    path.write_text(json.dumps({"seeds": [0], "runs": [spec_other]}))
    assert study.main([str(path), "--out", str(out)]) == 2
    assert "entry 'full' asks for" in capsys.readouterr().err


def test_a_world_queue_restores_first_and_saves_after_every_study(tmp_path, monkeypatch):
    """scripts/world_queue.py: Table 2, fusion's rescoring (it needs the checkpoint its machine trained), Fig. 3
    and Fig. 3 at equal steps seed by seed, then the tuning and Table 3; restored runs are finished before the
    first study starts, and the archive holds each study's runs as soon as it ends."""
    import world_queue

    spec, out = make_study(tmp_path)
    archive = tmp_path / "world.jsonl"
    run_record.save(out, archive)
    shutil.rmtree(out)
    calls = []

    def fake_study(argv):
        assert run_record.read(out / "full" / "seed0") is not None, "the archive was not restored first"
        calls.append((Path(argv[0]).stem, argv[argv.index("--seeds") + 1], argv[argv.index("--only") + 1:]
                      if "--only" in argv else []))
        folder = out / "made" / f"seed{len(calls)}"
        write_run(folder, ENTRY, len(calls), resumed=False)
        return 0

    monkeypatch.setattr(world_queue.study, "main", fake_study)
    saved = []
    monkeypatch.setattr(world_queue, "save", lambda o, a: saved.append(len(calls)) or run_record.save(o, a))
    assert world_queue.main(["--seeds", "4", "6", "--tuning-seeds", "4", "--out", str(out),
                             "--archive", str(archive)]) == 0
    fusion = ["world_fusion_beta_0.9", "world_fusion_beta_1.0"]
    assert calls == [("world_table2", "4", []), ("world_fusion", "4", fusion), ("world_fig3", "4", []),
                     ("world_fig3_steps", "4", []),
                     ("world_table2", "6", []), ("world_fusion", "6", fusion), ("world_fig3", "6", []),
                     ("world_fig3_steps", "6", []),
                     ("world_tuning", "4", []), ("world_table3", "4", []), ("world_table3", "6", [])]
    assert saved == list(range(1, 12)) and len(run_record.load_archive(archive)) == 6 + 11
    assert set(world_queue.FUSION) <= {run["name"] for run in study.load_study(
        study.REPO / "studies" / "world_fusion.yaml")["runs"]}


def test_a_world_queue_refuses_a_package_of_another_checkout(tmp_path, monkeypatch, capsys):
    """A queue started in a second checkout trains with that checkout's train.py (it imports the package beside
    it), while its tables import whatever coder the environment installed: the queue stops before any study
    rather than tabulate runs with another commit's code."""
    import world_queue

    import coder

    monkeypatch.setattr(coder, "__file__", str(tmp_path / "other" / "coder" / "__init__.py"))
    monkeypatch.setattr(world_queue.study, "main", lambda argv: pytest.fail("a study ran"))
    assert world_queue.main(["--seeds", "0", "--out", str(tmp_path / "runs"), "--archive",
                             str(tmp_path / "world.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"imports the coder package of {tmp_path / 'other'}" in err and f"PYTHONPATH={study.REPO}" in err


def test_a_world_queues_plan_lists_the_runs_neither_finished_nor_archived(tmp_path, capsys):
    """--plan: a run archived or finished on disk is done, one killed mid-way (a checkpoint, no record) is not,
    an entry two studies share is listed once (at its first study), and nothing trains."""
    import world_queue

    out, archive = tmp_path / "runs", tmp_path / "world.jsonl"
    named = {name: dict(ENTRY, name=name) for name in ("world_triplet_noise2.5", "world_t2_2_dcl")}
    write_run(out / "world_triplet_noise2.5" / "seed4", named["world_triplet_noise2.5"], 4, resumed=False)
    timed = out / "world_t2_5_pgc" / "seed3"  # another seed's #5, which took 90 minutes
    write_run(timed, dict(ENTRY, name="world_t2_5_pgc"), 3, resumed=False)
    (timed / "study_run.json").write_text(json.dumps({"seconds": 5400.0, "settings": {}}))
    run_record.save(out, archive)
    shutil.rmtree(out)  # seed 4's triplet lives on in the archive alone
    write_run(out / "world_t2_2_dcl" / "seed4", named["world_t2_2_dcl"], 4, resumed=False)
    (out / "world_t2_2_dcl" / "seed4" / "record.json").write_text(
        json.dumps(run_record.build(out / "world_t2_2_dcl" / "seed4", "world_t2_2_dcl", 4)))
    (out / "world_t2_3_mdcl" / "seed4").mkdir(parents=True)
    (out / "world_t2_3_mdcl" / "seed4" / "checkpoint_last.pth").write_bytes(b"killed after an epoch")
    steps = world_queue.plan(out, run_record.load_archive(archive), [4], [])
    todo = dict(((name, seed), missing) for name, seed, missing in steps)
    assert todo["world_table2", 4] == ["world_t2_3_mdcl", "world_t2_4_concept", "world_t2_5_pgc"]
    assert todo["world_fusion", 4] == list(world_queue.FUSION)
    assert "world_t2_5_pgc" not in todo["world_fig3", 4] and len(todo["world_fig3", 4]) == 5
    assert todo["world_fig3_steps", 4] == ["world_steps_b64_mdcl", "world_steps_b64_nomdcl"]
    assert "world_fig3_b128_nomdcl" not in todo["world_table3", 4]
    assert world_queue.main(["--seeds", "4", "--out", str(out), "--archive", str(archive), "--plan"]) == 0
    printed = capsys.readouterr().out
    assert "world_table2 seed 4: 3 to run (world_t2_3_mdcl, world_t2_4_concept, world_t2_5_pgc)" in printed
    left = 3 + 2 + 5 + 2 + 4  # Table 2, fusion, Fig. 3, Fig. 3 at equal steps, Table 3
    assert f"{left} runs left; the 1 of entries with a timed run in the archive take about 1.5 h" in printed
    assert not (out / "world_t2_4_concept").exists()


def test_the_committed_archive_matches_the_world_studies_entries():
    """studies/records/world.jsonl is the studies' evidence: every record parses, names an entry of a world
    study and carries that entry's settings (an entry changed after its runs were archived would otherwise have
    its new runs paired with the old ones), with a finished test evaluation (and a code commit, save for the
    first runs, made before the runner noted one)."""
    entries = {}
    for path in sorted((study.REPO / "studies").glob("world_*.yaml")):
        for run in study.load_study(path)["runs"]:
            assert entries.setdefault(run["name"], study.settings(run)) == study.settings(run), run["name"]
    archive = run_record.load_archive(study.REPO / "studies" / "records" / "world.jsonl")
    assert archive, "the archive holds no run"
    for (name, seed), record in archive.items():
        assert name in entries, f"archived run {name} seed {seed} is no world study's entry"
        assert record["settings"] == entries[name], f"{name} seed {seed} was made with other settings"
        assert "rsum" in record["eval"]["test"] and len(record["commit"] or "x" * 40) == 40, f"{name} seed {seed}"
