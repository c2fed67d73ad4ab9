"""Logging of a run: TensorBoard (docs/training.md: TensorBoard: losses, learning rates, gradient norms, diversity,
queue fill, k-means statistics, dev and test R@K) and one plain line per epoch (coder/runlog.py). Only the
main process writes; elsewhere it is a no-op."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from .runlog import RunLog

RECALLS = [(d, m) for d in ("i2t", "t2i") for m in ("r1", "r5", "r10")]


class TrainLogger:
    def __init__(self, out_dir: Path | None, purge_step: int | None = None, config_text: str | None = None):
        # purge_step: events a killed run logged after its last checkpoint are dropped, not shown twice
        self.writer = SummaryWriter(str(out_dir), purge_step=purge_step) if out_dir is not None else None
        self.lines = RunLog(out_dir or ".", enabled=out_dir is not None)
        if self.writer is not None and config_text is not None:
            self.writer.add_text("config", "```yaml\n" + config_text + "```", 0)  # the resolved hyper-parameters

    def scalar(self, tag: str, value, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, float(value), step)

    def step(self, step: int, loss, terms: dict, diag: dict, grad_norms: dict, lr: float, lr_text: float,
             rate: float, queue_fill: float | None) -> None:
        if self.writer is None:
            return
        self.lines.add(loss, terms)
        self.scalar("loss/total", loss, step)
        for name, value in terms.items():
            self.scalar(f"loss/{name}", value, step)
        self.scalar("train/lr", lr, step)
        self.scalar("train/lr_text", lr_text, step)  # the BERT group
        self.scalar("train/samples_per_s", rate, step)
        for name, norm in grad_norms.items():  # before clipping
            self.scalar("train/grad_norm" if name == "all" else f"train/grad_norm_{name}", norm, step)
        for name in ("diversity_v", "diversity_w"):
            if name in diag:
                d = diag[name].float()
                for stat in ("mean", "min", "max"):
                    self.scalar(f"diversity/{name}_{stat}", getattr(d, stat)(), step)
        if queue_fill is not None:
            self.scalar("queue/fill", queue_fill, step)

    def epoch_line(self, epoch: int, epochs: int, dev_rsum: float, best_rsum: float, best_epoch: int) -> None:
        self.lines.epoch(epoch, epochs, dev_rsum, best_rsum, best_epoch)

    def diversity_histogram(self, values: list[torch.Tensor], epoch: int) -> None:
        if values and self.writer is not None:
            self.writer.add_histogram("diversity/epoch", torch.cat(values).float().cpu(), epoch)

    def clusters(self, result, epoch: int) -> None:
        if self.writer is not None and result is not None:
            sizes = torch.bincount(result.labels, minlength=result.centroids.size(0)).float()
            self.scalar("kmeans/inertia", result.inertia[-1], epoch)
            self.scalar("kmeans/cluster_size_std", sizes.std(), epoch)
            self.scalar("kmeans/empty_clusters", (sizes == 0).sum(), epoch)

    def recalls(self, prefix: str, result: dict, step: int) -> None:
        """`prefix`/i2t_r1 ... and `prefix`/rsum (dev every epoch, test at the best epoch)."""
        for d, m in RECALLS:
            self.scalar(f"{prefix}/{d}_{m}", result[d][m], step)
        self.scalar(f"{prefix}/rsum", result["rsum"], step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()  # flushes the events
