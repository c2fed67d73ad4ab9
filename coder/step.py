"""One training step of CODER (Fig. 2; §3.2-3.5) in one module, as MoCo's builder holds its method.

`ContrastiveStep.forward(batch, epoch, labels)`:
1. queries: v^I, w^I (and v^C, w^C) from the trained encoders;
2. keys: the momentum encoders are updated (theta_k <- m theta_k + (1 - m) theta_q), then encode the same
   batch, without gradients;
3. the banks B_v, B_w are read as a cloned snapshot, so the loss sees them as they were before this step;
4. the terms of Eq. 8 (under DDP with `gather_batch`, over every rank's embeddings and every batch field
   a term declares);
5. in training mode, this step's keys with their image ids enter the banks (FIFO, gathered over ranks).
The loop only calls it, backpropagates and steps the optimizer: it never sees the banks.
"""
from __future__ import annotations

from torch import Tensor, nn

from . import distributed as dist
from .losses.objective import Objective
from .losses.terms import Bank
from .models.model import ITRModel


class ContrastiveStep(nn.Module):
    """Model + objective as one module, so DistributedDataParallel syncs the PGC classifier too."""

    def __init__(self, model: ITRModel, objective: Objective, gather_batch: bool = False):
        super().__init__()
        self.model, self.objective, self.gather_batch = model, objective, gather_batch

    def forward(self, batch: dict, epoch: int, labels: Tensor | None = None):
        """(total loss, the terms before weighting, diagnostics) of one step."""
        model, momentum = self.model, self.model.momentum
        out = model(batch["regions"], batch["region_lengths"], batch["input_ids"], batch["text_lengths"],
                    batch.get("clip"))
        bank = None
        if momentum is not None:
            out["v_key"], out["w_key"] = momentum.keys(model.image_encoder, model.text_encoder, batch["regions"],
                                                       batch["region_lengths"], batch["input_ids"],
                                                       batch["text_lengths"], batch.get("clip"))
            bank = Bank(*momentum.snapshot())
        seen_out, seen_batch, seen_labels = self._gathered(out, batch, labels)
        loss, terms, diag = self.objective(seen_out, seen_batch, epoch, bank, seen_labels)
        if self.training and momentum is not None:
            momentum.enqueue(out["v_key"].float(), out["w_key"].float(), batch["image_index"])
        return loss, terms, diag

    def _gathered(self, out: dict, batch: dict, labels: Tensor | None) -> tuple[dict, dict, Tensor | None]:
        """What the terms see: this rank's embeddings, the pairs' ids and the batch fields a term declares, or
        every rank's (with gradients) under DDP with `gather_batch`, so N processes of batch B train like one
        of N x B. A term reads the same fields in one process as under torchrun."""
        fields = {key: getattr(batch[key], "lengths", batch[key])  # a Lengths object: its tensor
                  for key in ("index", "image_index", *self.objective.batch_fields)}
        if self.gather_batch and dist.is_distributed():
            out = {name: dist.gather_with_grad(value) for name, value in out.items()}
            fields = {key: dist.gather_with_grad(value) for key, value in fields.items()}
            labels = dist.gather_with_grad(labels) if labels is not None else None
        return out, fields, labels

    def queue_fill(self) -> float | None:
        """Fraction of the banks' slots that hold real keys (None without banks)."""
        return self.model.momentum.queue_v.fill_fraction() if self.model.momentum is not None else None

