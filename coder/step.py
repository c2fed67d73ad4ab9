"""One training step of CODER (Fig. 2; §3.2-3.5), top to bottom, as MoCo's builder holds its method.

`ContrastiveStep.forward(batch, epoch, labels)`:
1. queries: v^I, w^I (and v^C, w^C) from the trained encoders;
2. keys: the momentum encoders are updated (theta_k <- m theta_k + (1 - m) theta_q), then encode the same batch,
   without gradients;
3. the banks B_v, B_w are read as a copy, so the loss sees them as they were before this step;
4. the terms of Eq. 8 (`Objective`, below; under DDP with `train.gather_batch`, over every rank's pairs);
5. in training mode, this step's keys with their image ids enter the banks (FIFO, gathered over ranks).
The model maps inputs to embeddings and knows nothing of training; the loop only calls this module,
backpropagates and steps the optimizer.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor, nn

from . import distributed as dist
from .config import check_choice, check_loss_keys
from .losses.dcl import POSITIVE_FORMS
from .losses.pgc import PrototypeClassifier, pgc
from .losses.registry import INSTANCE_LOSSES, Bank, InstanceLoss, LossInputs, concept_dcl
from .models.model import ITRModel, check_model_names
from .models.momentum import MomentumContrast

_HALF = (torch.float16, torch.bfloat16)


def _float32(t: Tensor) -> Tensor:
    return t.float() if t.dtype in _HALF else t


class Objective(nn.Module):
    """Eq. 8, L = lambda L_DCL^I + L_M-DCL + L_DCL^C + L_PGC, over the terms this config builds (a weight of 0
    builds none) and this step has the inputs of (the banks; PGC's labels once k-means has run, §3.4). Every term
    is computed in float32 outside autocast, whatever precision the encoders ran in."""

    def __init__(self, loss_cfg: dict, instance: InstanceLoss, weights: dict[str, float],
                 prototypes: PrototypeClassifier | None = None, pgc_start_epoch: int = 0):
        super().__init__()
        self.loss_cfg, self.instance, self.weights = loss_cfg, instance, weights
        self.prototypes = prototypes  # P^C of Eq. 7, trained with the encoders
        self.pgc_start_epoch = pgc_start_epoch

    @property
    def batch_fields(self) -> tuple[str, ...]:
        """Batch fields the instance loss reads (gathered from every rank with the embeddings under DDP)."""
        return self.instance.batch_fields

    def needs_labels(self, epoch: int) -> bool:
        """Whether L_PGC reads k-means prototype labels in this epoch (from cluster.start_epoch, §3.4)."""
        return self.prototypes is not None and epoch >= self.pgc_start_epoch

    def forward(self, out: dict[str, Tensor], fields: dict, epoch: int, bank: Bank | None = None,
                labels: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """Total loss, the terms before weighting (for the log), and diagnostics (the diversity values)."""
        device = next(iter(out.values())).device.type
        # bf16 sims would round the logits DCL and UTO sharpen (a device without autocast has none to switch off)
        with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext():
            out = {name: _float32(value) for name, value in out.items()}
            bank = Bank(*map(_float32, bank)) if bank is not None else None
            x = LossInputs(out, fields, epoch, bank, self.loss_cfg)
            terms = {"instance": self.instance.batch(x)}  # L_DCL^I: Eq. 5 (Eq. 4, triplet, InfoNCE, UTO)
            if bank is not None and "memory" in self.weights:
                terms["memory"] = self.instance.memory(x)  # L_M-DCL: Eq. 6 (UTO: its queue term)
            if "concept" in self.weights:
                terms["concept"] = concept_dcl(x)  # L_DCL^C: Eq. 5 on v^C, w^C
            if "pgc" in self.weights and labels is not None:
                terms["pgc"] = pgc(self.prototypes(out["v_c"]), self.prototypes(out["w_c"]), labels)  # L_PGC: Eq. 7
            total = sum(self.weights[name] * value for name, value in terms.items())  # Eq. 8
        return total, terms, x.diag


def objective_weights(cfg: dict) -> dict[str, float]:
    """The Eq. 8 terms a config builds, with their weights: the instance term, M-DCL with momentum banks, L_DCL^C
    and L_PGC with the concept branch; a term whose weight is 0 is not built. Refuses a name no registry knows,
    and a loss key set that no built term reads."""
    loss, model = cfg["loss"], cfg["model"]
    check_choice("loss.instance", loss["instance"], INSTANCE_LOSSES)
    check_choice("loss.dcl_positive", loss["dcl_positive"], POSITIVE_FORMS)
    concept = model["concept"]["enabled"]
    weights = {"instance": loss["instance_weight"]}
    if model["momentum"]["enabled"] and loss["memory_weight"] > 0:
        weights["memory"] = loss["memory_weight"]
    if concept and loss["concept_weight"] > 0:
        weights["concept"] = loss["concept_weight"]
    if concept and loss["pgc_weight"] > 0:
        weights["pgc"] = loss["pgc_weight"]
    names = INSTANCE_LOSSES[loss["instance"]].terms  # (batch term, memory term) as the schema's `reads` names them
    check_loss_keys(cfg, (names[0],) + ((names[1],) if "memory" in weights else ())
                    + (("concept",) if "concept" in weights else ()))
    return weights


def build_objective(cfg: dict) -> Objective:
    """The Eq. 8 objective of a resolved config (`objective_weights`), with P^C when it has L_PGC."""
    weights, model = objective_weights(cfg), cfg["model"]
    prototypes = PrototypeClassifier(cfg["cluster"]["k"], model["embed_dim"]) if "pgc" in weights else None
    return Objective(cfg["loss"], INSTANCE_LOSSES[cfg["loss"]["instance"]], weights, prototypes,
                     cfg["cluster"]["start_epoch"])


def check_config(cfg: dict) -> None:
    """Every check of a loaded config that needs no data: the schema's (done by load_config), the names the
    registries own and the loss keys' readers, as the builders check them, without building anything."""
    check_model_names(cfg["model"])
    objective_weights(cfg)


class ContrastiveStep(nn.Module):
    """Model, momentum encoders with their banks, and objective as one module, so DistributedDataParallel syncs
    the PGC classifier too."""

    def __init__(self, model: ITRModel, objective: Objective, momentum: MomentumContrast | None = None,
                 gather_batch: bool = False):
        super().__init__()
        self.model, self.objective, self.momentum, self.gather_batch = model, objective, momentum, gather_batch

    def forward(self, batch: dict, epoch: int, labels: Tensor | None = None):
        """(total loss, the terms before weighting, diagnostics) of one step."""
        model, momentum = self.model, self.momentum
        # 1. queries (Fig. 2): v^I, w^I and, with the concept branch, v^C, w^C
        out = model(batch["regions"], batch["region_lengths"], batch["input_ids"], batch["text_lengths"],
                    batch.get("clip"))
        bank = None
        if momentum is not None:
            # 2. keys (§3.2): theta_k <- m theta_k + (1 - m) theta_q, then this batch through the key encoders
            with torch.no_grad():
                momentum.update(model.image_encoder, model.text_encoder)
                out["v_key"], out["w_key"] = momentum.encode(batch["regions"], batch["region_lengths"],
                                                             batch["input_ids"], batch["text_lengths"],
                                                             batch.get("clip"))
            # 3. the banks as they are before this step (a copy, MoCo's queue.clone().detach())
            bank = Bank(*momentum.snapshot())
        # 4. Eq. 8 over this rank's pairs, or every rank's under DDP with gather_batch
        loss, terms, diag = self.objective(*self._gathered(out, batch), epoch, bank, self._gathered_labels(labels))
        # 5. this step's keys, with their image ids, enter the banks
        if self.training and momentum is not None:
            momentum.enqueue(out["v_key"].float(), out["w_key"].float(), batch["image_index"])
        return loss, terms, diag

    def _gathered(self, out: dict, batch: dict) -> tuple[dict, dict]:
        """What the terms see: this rank's embeddings, the pairs' ids and the batch fields the loss declares, or
        every rank's (with gradients) under DDP with `gather_batch`, so N processes of batch B train like one of
        N x B. A term reads the same fields in one process as under torchrun."""
        fields = {key: getattr(batch[key], "lengths", batch[key])  # a Lengths object: its tensor
                  for key in ("index", "image_index", *self.objective.batch_fields)}
        if self.gather_batch and dist.is_distributed():
            out = {name: dist.gather_with_grad(value) for name, value in out.items()}
            fields = {key: dist.gather_with_grad(value) for key, value in fields.items()}
        return out, fields

    def _gathered_labels(self, labels: Tensor | None) -> Tensor | None:
        if labels is not None and self.gather_batch and dist.is_distributed():
            return dist.gather_with_grad(labels)
        return labels

    def queue_fill(self) -> float | None:
        """Fraction of the banks' slots that hold real keys (None without banks)."""
        return self.momentum.queue_v.fill_fraction() if self.momentum is not None else None


def compile_step(step: ContrastiveStep, backend: str) -> list[nn.Module]:
    """`train.compile`: torch.compile, in place (`nn.Module.compile`), of the modules whose forward is the step's
    compute: the model (its forward is the training forward only: evaluation and `evaluate.py` call
    `encode_image` / `encode_text` and stay eager), the momentum key encoders (the keys of §3.2; k-means'
    features come through them too) and the objective (Eq. 8's similarity matrices and their elementwise
    chains). In place, so no `_orig_mod.` prefix enters a state dict: checkpoints are the eager run's, and a
    compiled run resumes eager and vice versa. Returns the modules compiled (none for "off").

    Left eager, on purpose: the momentum update (already one fused `_foreach_lerp_` per encoder, nothing left
    to fuse) and the banks' enqueue, whose write position is a Python int mirrored from the `ptr` buffer so
    that enqueue never reads the device: traced, that int would be a constant of the graph and every step's
    new position a recompile. Under inductor random ops draw from PyTorch's own generator as eager does
    (`fallback_random`), so dropout masks are eager's: compiled and eager runs differ by float rounding only,
    the checkpoint's random states mean the same to both, and `benchmarks/gpu_check.py` can hold the compiled
    losses to eager's within a tolerance."""
    if backend == "off":
        return []
    options = {"fallback_random": True} if backend == "inductor" else None
    modules = [step.model, step.objective]
    if step.momentum is not None:
        modules += [step.momentum.key_image_encoder, step.momentum.key_text_encoder]
    for module in modules:
        module.compile(backend=backend, options=options)
    return modules


def build_step(cfg: dict, model: ITRModel) -> ContrastiveStep:
    """The training step of a resolved config around a built model: its objective and, with
    `model.momentum.enabled`, key encoders copied from the model's encoders and the two banks."""
    mcfg = cfg["model"]["momentum"]
    momentum = MomentumContrast(model.image_encoder, model.text_encoder, cfg["model"]["embed_dim"],
                                mcfg["queue_size"], mcfg["m"]) if mcfg["enabled"] else None
    return ContrastiveStep(model, build_objective(cfg), momentum, cfg["train"]["gather_batch"])
