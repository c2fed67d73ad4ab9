"""The per-epoch log line (coder/runlog.py): printed on stdout and appended to <run>/train.log by a run whose
stderr is not a terminal, with no progress bar; and train.keep_last_checkpoint=false, which removes
checkpoint_last.pth once the run has finished."""
import contextlib
import io
import re
import textwrap

import pytest

import train
from coder.runlog import RunLog

EPOCHS = 2
LINE = re.compile(r"epoch (\d) \(of 2\) \| loss -?\d+\.\d{4}( \w+ -?\d+\.\d{4})* \| dev R@sum (\d+\.\d) \| "
                  r"best (\d+\.\d) \(epoch (\d)\) \| \d+\.\d s, \d+\.\d s elapsed")


def test_line_averages_the_logged_steps(tmp_path):
    log = RunLog(tmp_path)
    log.add(1.0, {"dcl_i": 0.25})
    log.add(2.0, {"dcl_i": 0.75})
    line = log.line(3, 12, 401.25, 410.0, 1, elapsed=4321.0)
    assert line.startswith("epoch 3 (of 12) | loss 1.5000 dcl_i 0.5000 | dev R@sum 401.2 | best 410.0 (epoch 1) | ")
    assert line.endswith(", 4321.0 s elapsed")  # the run's time, which a resume carries on (the Trainer's clock)
    log.epoch(3, 12, -1.0, 410.0, 1, elapsed=5.0)
    assert "| dev R@sum – |" in (tmp_path / "train.log").read_text()
    log.add(4.0, {})
    assert log.line(4, 12, 1.0, 1.0, 4, elapsed=6.0).startswith("epoch 4 (of 12) | loss 4.0000 |")  # a fresh average


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_coder_data, tiny_bert_dir):
    """A 2-epoch tiny run with progress bars requested (stderr is captured, not a terminal)."""
    tmp = tmp_path_factory.mktemp("runlog")
    config = tmp / "tiny.yaml"
    config.write_text(textwrap.dedent(f"""
        data: {{root: {tiny_coder_data}}}
        model: {{text_encoder: {tiny_bert_dir}, region_dim: 16, embed_dim: 32}}
        train: {{epochs: {EPOCHS}, batch_size: 4, max_steps_per_epoch: 2, device: cpu, log_every: 1,
                 keep_last_checkpoint: false}}
        eval: {{batch_size: 16}}
        """))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert train.main(["--config", str(config), "--output", str(tmp / "run")]) == 0
    return tmp / "run", out.getvalue(), err.getvalue()


def test_a_run_off_a_terminal_prints_one_line_per_epoch(run):
    out, stdout, stderr = run
    lines = [line for line in stdout.splitlines() if line.startswith("epoch ")]
    assert [LINE.fullmatch(line).group(1) for line in lines] == ["0", "1"], lines
    assert (out / "train.log").read_text().splitlines() == lines
    assert "\r" not in stderr and "it/s" not in stderr, "a progress bar went to a non-terminal"
    best = max(float(LINE.fullmatch(line).group(3)) for line in lines)
    assert float(LINE.fullmatch(lines[-1]).group(4)) == best


def test_keep_last_checkpoint_false_removes_it_after_the_run(run):
    out = run[0]
    assert (out / "model_best.pth").is_file() and (out / "eval_test.json").is_file()
    assert not (out / "checkpoint_last.pth").exists()
