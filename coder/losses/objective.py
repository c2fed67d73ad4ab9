"""The training objective: the weighted sum of Eq. 8's terms, L = lambda L_DCL^I + L_M-DCL^I + L_DCL^C + L_PGC.

`build_objective(cfg)` is the one reader of the `loss` config: it picks the instance term from a registry
(Eq. 5, the ablations' baselines, USER's UTO, or a loss registered with `register_instance_loss`) and
adds the memory, concept and PGC terms the model supports. `Objective` sums whatever terms it is given;
every term is computed in float32 outside autocast, whatever precision the encoders ran in.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ..config import DEFAULTS, ConfigError
from .terms import (
    PGC,
    Bank,
    ConceptDCL,
    Diversity,
    InfoNCE,
    InstanceDCL,
    MemoryDCL,
    Term,
    TermInputs,
    Triplet,
    UTOBatch,
    UTOQueue,
)

__all__ = ["Objective", "build_objective", "register_instance_loss", "INSTANCE_LOSSES", "Bank"]

_HALF = (torch.float16, torch.bfloat16)


class Objective(nn.Module):
    """sum_t weight_t x term_t (Eq. 8) over the terms active in this step (e.g. PGC once labels exist)."""

    def __init__(self, terms: dict[str, tuple[float, Term]]):
        super().__init__()
        self.terms = nn.ModuleDict({name: term for name, (_, term) in terms.items()})
        self.weights = {name: weight for name, (weight, _) in terms.items()}

    @property
    def batch_fields(self) -> tuple[str, ...]:
        """Batch fields some term reads (gathered from every rank with the embeddings under DDP)."""
        return tuple(sorted({f for term in self.terms.values() for f in term.batch_fields}))

    @property
    def prototypes(self) -> nn.Module | None:
        """P^C of Eq. 7, when the objective has a PGC term (it trains with the concept branch)."""
        return self.terms["pgc"].classifier if "pgc" in self.terms else None

    def needs_labels(self, epoch: int) -> bool:
        """Whether a term reads k-means prototype labels in this epoch (PGC from cluster.start_epoch, §3.4)."""
        return "pgc" in self.terms and epoch >= self.terms["pgc"].start_epoch

    def forward(self, out: dict[str, Tensor], batch: dict, epoch: int, bank: Bank | None = None,
                labels: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """Total loss, the terms before weighting (for logging), and diagnostics (diversity values)."""
        device = next(iter(out.values())).device.type
        # bf16 sims would round the logits DCL/UTO sharpen (a device without autocast has none to switch off)
        with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext():
            out = {name: value.float() if value.dtype in _HALF else value for name, value in out.items()}
            if bank is not None:
                bank = Bank(*(t.float() if t.dtype in _HALF else t for t in bank))
            inputs = TermInputs(out, batch, epoch, bank, labels)
            terms = {name: term(inputs) for name, term in self.terms.items() if term.active(inputs)}
            total = sum(self.weights[name] * value for name, value in terms.items())  # Eq. 8
        return total, terms, inputs.diag


# ---------------------------------------------------------------------------------------------- factory
@dataclass(frozen=True)
class InstanceLoss:
    """A registered instance term: its builder (from the `loss` config) and the loss keys it reads, and the
    same for its memory-bank counterpart (M-DCL, Eq. 6, unless the loss brings its own)."""

    build: Callable[[dict], Term]
    keys: tuple[str, ...]
    memory: Callable[[dict], Term]
    memory_keys: tuple[str, ...]


INSTANCE_LOSSES: dict[str, InstanceLoss] = {}

_DCL_KEYS = ("mu", "gamma", "dcl_positive")
_DIVERSITY_KEYS = ("eps", "detach_diversity", "bank_diversity")


def _diversity(loss: dict) -> Diversity:
    return Diversity(loss["eps"], loss["detach_diversity"], loss["bank_diversity"])


def _dcl(loss: dict, with_diversity: bool) -> dict:
    return {"mu": loss["mu"], "gamma": loss["gamma"], "positive": loss["dcl_positive"],
            "diversity": _diversity(loss) if with_diversity else None}


def _memory_dcl(loss: dict, with_diversity: bool = False) -> MemoryDCL:
    return MemoryDCL(**_dcl(loss, with_diversity), mask_own_image=loss["mask_own_image"])


def register_instance_loss(name: str, build: Callable[[dict], Term], keys: tuple[str, ...] = (),
                           memory: Callable[[dict], Term] = _memory_dcl,
                           memory_keys: tuple[str, ...] = _DCL_KEYS + ("mask_own_image",)) -> None:
    """Make `loss.instance: <name>` build `build(loss_cfg)`; `keys` are the `loss` keys it reads. With momentum
    banks its memory term is M-DCL (Eq. 6) unless `memory` builds another."""
    INSTANCE_LOSSES[name] = InstanceLoss(build, keys, memory, memory_keys)


register_instance_loss("dcl", lambda loss: InstanceDCL(**_dcl(loss, True)), _DCL_KEYS + _DIVERSITY_KEYS,
                       memory=lambda loss: _memory_dcl(loss, True),  # Eq. 5's diversity weights M-DCL too
                       memory_keys=_DCL_KEYS + _DIVERSITY_KEYS + ("mask_own_image",))
register_instance_loss("dcl_implicit", lambda loss: InstanceDCL(**_dcl(loss, False)), _DCL_KEYS)  # Eq. 4
register_instance_loss("triplet", lambda loss: Triplet(loss["margin"], loss["warmup_epochs"]),
                       ("margin", "warmup_epochs"))
register_instance_loss("infonce", lambda loss: InfoNCE(loss["temperature"]), ("temperature",))
_UTO_KEYS = ("uto_alpha", "uto_eps")
register_instance_loss("uto", lambda loss: UTOBatch(loss["uto_alpha"], loss["uto_eps"]), _UTO_KEYS,  # USER
                       memory=lambda loss: UTOQueue(loss["uto_alpha"], loss["uto_eps"]), memory_keys=_UTO_KEYS)


def build_objective(cfg: dict) -> Objective:
    """The Eq. 8 objective of a resolved config: the instance term, M-DCL with momentum banks, L_DCL^C and
    L_PGC with the concept branch; a term whose weight is 0 is not built."""
    check_loss_keys(cfg)
    loss, model, chosen = cfg["loss"], cfg["model"], INSTANCE_LOSSES[cfg["loss"]["instance"]]
    terms: dict[str, tuple[float, Term]] = {"instance": (loss["instance_weight"], chosen.build(loss))}
    if "memory" in _term_names(cfg):
        terms["memory"] = (loss["memory_weight"], chosen.memory(loss))
    if "concept" in _term_names(cfg):
        terms["concept"] = (loss["concept_weight"],
                            ConceptDCL(loss["mu"], loss["gamma"], loss["dcl_positive"], _diversity(loss)))
    if "pgc" in _term_names(cfg):
        terms["pgc"] = (loss["pgc_weight"], PGC(cfg["cluster"]["k"], model["embed_dim"], cfg["cluster"]["start_epoch"]))
    return Objective(terms)


def _term_names(cfg: dict) -> tuple[str, ...]:
    """The Eq. 8 terms a config builds: what the model supports, with a weight above 0."""
    loss, model = cfg["loss"], cfg["model"]
    concept = model["concept"]["enabled"]
    return ("instance",) + (("memory",) if model["momentum"]["enabled"] and loss["memory_weight"] > 0 else ()) \
        + (("concept",) if concept and loss["concept_weight"] > 0 else ()) \
        + (("pgc",) if concept and loss["pgc_weight"] > 0 else ())


_WEIGHTS = ("instance", "instance_weight", "memory_weight", "concept_weight", "pgc_weight")


def check_loss_keys(cfg: dict) -> None:
    """An unknown loss.instance, or a `loss` key set away from its default that no built term reads: a
    mistake, not a no-op (config validation calls this)."""
    loss = cfg["loss"]
    if loss["instance"] not in INSTANCE_LOSSES:
        raise ConfigError(f"config key 'loss.instance' must be one of {tuple(INSTANCE_LOSSES)}, got "
                          f"{loss['instance']!r}")
    chosen, terms = INSTANCE_LOSSES[loss["instance"]], _term_names(cfg)
    used = set(chosen.keys) | (set(chosen.memory_keys) if "memory" in terms else set()) \
        | (set(_DCL_KEYS + ("eps", "detach_diversity")) if "concept" in terms else set())
    defaults = DEFAULTS["loss"]
    for key, value in loss.items():
        if key not in _WEIGHTS and key not in used and key in defaults and value != defaults[key]:
            raise ConfigError(f"config key 'loss.{key}' is set ({value!r}) but no term of this objective "
                              f"({', '.join(terms)}; loss.instance '{loss['instance']}') reads it")
