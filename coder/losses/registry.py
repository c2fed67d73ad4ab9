"""The instance losses a config can name (`loss.instance`), and what one step's terms read (`LossInputs`).

Each loss is a plain function of similarities in its own file (dcl.py, triplet.py, infonce.py, uto.py); an entry
here says how the step calls it. Adding a loss (docs/adding-a-loss.md): its function, one `register_instance_loss`
line, and its keys in coder/config.py's SCHEMA with `reads=(<name>,)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, NamedTuple

from torch import Tensor

from .dcl import dcl, dcl_bidirectional, diversity
from .infonce import infonce
from .triplet import triplet
from .uto import uto_term

__all__ = ["Bank", "LossInputs", "InstanceLoss", "INSTANCE_LOSSES", "register_instance_loss", "concept_dcl"]


class Bank(NamedTuple):
    """The coupled memory banks B_v (image keys) and B_w (caption keys) with the image id of each entry."""

    v: Tensor
    w: Tensor
    ids_v: Tensor
    ids_w: Tensor


class cached_property:  # noqa: N801 (named as the functools decorator it stands in for)
    """`functools.cached_property` without the lock it takes before Python 3.12, which torch.compile cannot enter
    (`train.compile`: a graph break at every shared similarity of every step); a step's `LossInputs` lives in
    one thread."""

    def __init__(self, fn):
        self.fn, self.name, self.__doc__ = fn, fn.__name__, fn.__doc__

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.fn(obj)  # an instance attribute: found before this descriptor
        return value


class LossInputs:
    """What the terms of one step read: the embeddings `out` (v_i, w_i; v_c, w_c; v_key, w_key), the batch
    fields (`index`, `image_index`, and those a loss declares), the epoch, the banks as they were before the
    step, and the `loss` config. Similarities and diversities are computed once and shared by the terms."""

    def __init__(self, out: dict[str, Tensor], fields: dict, epoch: int, bank: Bank | None, cfg: dict):
        self.out, self.fields, self.epoch, self.bank, self.cfg = out, fields, epoch, bank, cfg
        self.diag: dict[str, Tensor] = {}  # diagnostics for the log (the diversity values)

    @cached_property
    def sims(self) -> Tensor:
        """S_nq = cos(v_n, w_q) of the batch (Eq. 3-5)."""
        return self.out["v_i"] @ self.out["w_i"].t()

    @cached_property
    def bank_sims(self) -> tuple[Tensor, Tensor]:
        """Batch anchors against the other modality's bank: (v^I B_w^T, w^I B_v^T) (Eq. 6)."""
        return self.out["v_i"] @ self.bank.w.t(), self.out["w_i"] @ self.bank.v.t()

    @cached_property
    def key_positives(self) -> tuple[Tensor, Tensor]:
        """Each anchor against its pair's momentum key, the positive of Eq. 6: (v^I . w_key, w^I . v_key)."""
        return (self.out["v_i"] * self.out["w_key"]).sum(-1), (self.out["w_i"] * self.out["v_key"]).sum(-1)

    def anchor_diversity(self, sims: Tensor, bank_sims: Tensor | None = None) -> Tensor:
        """Eq. 3 per anchor (row); a weight, not a gradient path, with `loss.detach_diversity`; with banks and
        `loss.bank_diversity`, the mean of the batch- and bank-level values (§3.3, Table 3 "MB")."""
        if self.cfg["detach_diversity"]:
            sims, bank_sims = sims.detach(), bank_sims.detach() if bank_sims is not None else None
        div = diversity(sims, eps=self.cfg["eps"])
        if bank_sims is not None and self.cfg["bank_diversity"]:
            div = (div + diversity(bank_sims, eps=self.cfg["eps"])) / 2
        return div

    @cached_property
    def diversity(self) -> tuple[Tensor, Tensor]:
        """(div of the images, div of the captions) of Eq. 3, shared by L_DCL^I and M-DCL."""
        bank_w, bank_v = self.bank_sims if self.bank is not None else (None, None)
        div_v, div_w = self.anchor_diversity(self.sims, bank_w), self.anchor_diversity(self.sims.t(), bank_v)
        self.diag["diversity_v"], self.diag["diversity_w"] = div_v.detach(), div_w.detach()
        return div_v, div_w

    def dcl_settings(self) -> dict:
        return {"mu": self.cfg["mu"], "gamma": self.cfg["gamma"], "positive": self.cfg["dcl_positive"]}


def instance_dcl(x: LossInputs, with_diversity: bool = True) -> Tensor:
    """L_DCL^I = l(V, W) + l(W, V) on the batch: Eq. 5, or Eq. 4 without the diversity."""
    div_v, div_w = x.diversity if with_diversity else (None, None)
    c = x.dcl_settings()
    return dcl_bidirectional(x.sims, c["mu"], c["gamma"], div_v, div_w, c["positive"])


def memory_dcl(x: LossInputs, with_diversity: bool = False) -> Tensor:
    """L_M-DCL (Eq. 6): batch anchors against the other modality's bank, the pair's momentum key as positive;
    with `loss.mask_own_image`, bank entries of the anchor's own image are not negatives."""
    (bank_w, bank_v), (pos_v, pos_w) = x.bank_sims, x.key_positives
    div_v, div_w = x.diversity if with_diversity else (None, None)
    mask_w = mask_v = None
    if x.cfg["mask_own_image"]:
        own = x.fields["image_index"].to(x.bank.ids_w.device)[:, None]
        mask_w, mask_v = x.bank.ids_w[None, :] == own, x.bank.ids_v[None, :] == own
    return dcl(bank_w, pos_sims=pos_v, div=div_v, neg_mask=mask_w, **x.dcl_settings()) + \
        dcl(bank_v, pos_sims=pos_w, div=div_w, neg_mask=mask_v, **x.dcl_settings())


def concept_dcl(x: LossInputs) -> Tensor:
    """L_DCL^C: Eq. 5 between the concept-level embeddings v^C, w^C, with batch-level diversity."""
    sims = x.out["v_c"] @ x.out["w_c"].t()
    c = x.dcl_settings()
    return dcl_bidirectional(sims, c["mu"], c["gamma"], x.anchor_diversity(sims), x.anchor_diversity(sims.t()),
                             c["positive"])


def uto_batch(x: LossInputs) -> Tensor:
    """USER's UTO over in-batch negatives, both directions, each pair's positive counted once."""
    alpha, eps = x.cfg["uto_alpha"], x.cfg["uto_eps"]
    return uto_term(x.sims, alpha=alpha, eps=eps) + uto_term(x.sims.t(), alpha=alpha, eps=eps, with_positive=False)


def uto_queue(x: LossInputs) -> Tensor:
    """USER's UTO against the banks, the pair's momentum key as positive, one per direction."""
    (bank_w, bank_v), (pos_v, pos_w) = x.bank_sims, x.key_positives
    alpha, eps = x.cfg["uto_alpha"], x.cfg["uto_eps"]
    return uto_term(bank_w, pos_v, alpha=alpha, eps=eps) + uto_term(bank_v, pos_w, alpha=alpha, eps=eps)


@dataclass(frozen=True)
class InstanceLoss:
    """A `loss.instance` entry: the batch term (lambda L^I of Eq. 8), the memory-bank term that goes with it (M-DCL,
    Eq. 6, unless the loss brings its own), the batch fields it reads (gathered over ranks like the embeddings),
    and the names of its two terms for the schema's `reads`."""

    batch: Callable[[LossInputs], Tensor]
    memory: Callable[[LossInputs], Tensor]
    batch_fields: tuple[str, ...]
    terms: tuple[str, str]


INSTANCE_LOSSES: dict[str, InstanceLoss] = {}


def register_instance_loss(name: str, batch: Callable[[LossInputs], Tensor],
                           memory: Callable[[LossInputs], Tensor] = memory_dcl, batch_fields: tuple[str, ...] = (),
                           memory_term: str = "memory_dcl") -> None:
    """Make `loss.instance: <name>` train with `batch(inputs)`; with momentum banks its memory term is M-DCL
    (Eq. 6) unless `memory` (named `memory_term` in the schema's `reads`) is given."""
    INSTANCE_LOSSES[name] = InstanceLoss(batch, memory, tuple(batch_fields), (name, memory_term))


register_instance_loss("dcl", instance_dcl, partial(memory_dcl, with_diversity=True), memory_term="memory_dcl_div")
register_instance_loss("dcl_implicit", partial(instance_dcl, with_diversity=False))  # Eq. 4
register_instance_loss("triplet", lambda x: triplet(x.sims, x.cfg["margin"],  # BTR, Table 2 #1
                                                    hardest=x.epoch >= x.cfg["warmup_epochs"]))
register_instance_loss("infonce", lambda x: infonce(x.sims, x.cfg["temperature"]))  # BIN
register_instance_loss("uto", uto_batch, uto_queue, memory_term="memory_uto")  # USER
