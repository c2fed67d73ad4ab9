"""Logging of a run: TensorBoard (docs/training.md: TensorBoard: losses, learning rates, gradient norms, diversity,
queue fill, k-means statistics, dev and test R@K) and one plain line per epoch (coder/runlog.py). Only the
main process writes; elsewhere it is a no-op."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from .runlog import RunLog

RECALLS = [(d, m) for d in ("i2t", "t2i") for m in ("r1", "r5", "r10")]


def read_scalars(values: dict) -> dict:
    """{name: float} of 0-dim tensors and numbers: the tensors stacked on their device and read back in one copy
    (a CUDA host waits once per read, so 20 `float()` calls would be 20 waits)."""
    tensors = {name: v for name, v in values.items() if torch.is_tensor(v)}
    out = {name: float(v) for name, v in values.items() if name not in tensors}
    by_device: dict = {}
    for name, v in tensors.items():
        by_device.setdefault(v.device, []).append(name)
    for names in by_device.values():
        read = torch.stack([tensors[n].detach().float().reshape(()) for n in names]).cpu().tolist()
        out.update(zip(names, read))
    return {name: out[name] for name in values}


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
        values = {"loss/total": loss, **{f"loss/{name}": value for name, value in terms.items()}}
        for name, norm in grad_norms.items():  # before clipping
            values["train/grad_norm" if name == "all" else f"train/grad_norm_{name}"] = norm
        for name in ("diversity_v", "diversity_w"):
            if name in diag:
                d = diag[name].float()
                values.update({f"diversity/{name}_{stat}": getattr(d, stat)() for stat in ("mean", "min", "max")})
        values = read_scalars(values)  # one device -> host copy for the step's values, not one wait per value
        self.lines.add(values["loss/total"], {name: values[f"loss/{name}"] for name in terms})
        values.update({"train/lr": lr, "train/lr_text": lr_text, "train/samples_per_s": rate})  # lr_text: BERT's
        if queue_fill is not None:
            values["queue/fill"] = queue_fill
        for tag, value in values.items():
            self.scalar(tag, value, step)

    def epoch_end(self, epoch: int, epochs: int, dev_rsum: float, best_rsum: float, best_epoch: int,
                  train_seconds: float) -> None:
        """The epoch's line, and `time/train_seconds`: the run's wall time so far, over its resumes."""
        self.scalar("time/train_seconds", train_seconds, epoch)
        self.lines.epoch(epoch, epochs, dev_rsum, best_rsum, best_epoch, train_seconds)

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
