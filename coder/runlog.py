"""One plain line per epoch, on stdout and appended to <run>/train.log: what a researcher reads in a log file
(progress bars stay for a terminal, where carriage returns do not fill a file with fragments); and the clock whose
elapsed time the line gives, which a resumed run continues from its checkpoint."""
from __future__ import annotations

import sys
import time
from pathlib import Path


def progress_bars(requested: bool) -> bool:
    """Progress bars only when asked for and stderr is a terminal."""
    return requested and sys.stderr.isatty()


class RunClock:
    """The wall time of a run's training so far, over every process a killed run was resumed in: `before` is what
    its checkpoint counted (what a killed process did after its last checkpoint is lost and not counted)."""

    def __init__(self, before: float = 0.0):
        self.before, self.start = before, time.perf_counter()

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.start


class RunLog:
    """Averages the losses logged during an epoch and writes the epoch's line when it ends."""

    def __init__(self, out_dir: str | Path, enabled: bool = True):
        self.path, self.enabled = Path(out_dir) / "train.log", enabled
        self.epoch_start = time.perf_counter()
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, loss, terms: dict) -> None:
        """One logged step's total loss and loss terms (tensors or floats)."""
        for name, value in {"loss": loss, **terms}.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
        self.count += 1

    def line(self, epoch: int, epochs: int, dev_rsum: float, best_rsum: float, best_epoch: int,
             elapsed: float) -> str:
        """`elapsed`: the run's seconds so far, a resumed run's counted from its start, not from the resume."""
        now = time.perf_counter()
        losses = " ".join(f"{name} {total / self.count:.4f}" for name, total in self.sums.items()) if self.count \
            else "loss –"
        dev = f"{dev_rsum:.1f}" if dev_rsum >= 0 else "–"  # -1: not validated this epoch (train.eval_every)
        best = f"{best_rsum:.1f} (epoch {best_epoch})" if best_epoch >= 0 else "–"
        return (f"epoch {epoch} (of {epochs}) | {losses} | dev R@sum {dev} | best {best} | "
                f"{now - self.epoch_start:.1f} s, {elapsed:.1f} s elapsed")

    def epoch(self, epoch: int, epochs: int, dev_rsum: float, best_rsum: float, best_epoch: int,
              elapsed: float) -> None:
        """Print and append the line of the epoch that just ended, then start the next epoch's averages."""
        if self.enabled:
            text = self.line(epoch, epochs, dev_rsum, best_rsum, best_epoch, elapsed)
            print(text, flush=True)
            with self.path.open("a") as log:
                log.write(text + "\n")
        self.sums, self.count, self.epoch_start = {}, 0, time.perf_counter()
