"""The terms of Eq. 8 (and the baselines' and USER's), each a module that owns its hyper-parameters.

A term reads a `TermInputs` (the step's embeddings, batch fields, epoch, memory bank and PGC labels) and
returns one scalar. It declares what it needs: `batch_fields` (gathered from every rank under DDP, like
the embeddings), `needs_bank` (skipped without momentum banks), `needs_labels` (skipped until k-means has
produced prototype labels). Similarities are computed once per step and shared through `TermInputs`.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from torch import Tensor, nn

from .dcl import dcl, dcl_bidirectional, diversity
from .infonce import infonce
from .pgc import PrototypeClassifier, pgc
from .triplet import triplet
from .uto import uto_term


class Bank(NamedTuple):
    """The coupled memory banks B_v (image keys) and B_w (caption keys) with the image id of each entry."""

    v: Tensor
    w: Tensor
    ids_v: Tensor
    ids_w: Tensor


class TermInputs:
    """One step's inputs of the terms; similarities are computed on first use and shared."""

    def __init__(self, out: dict[str, Tensor], batch: dict, epoch: int, bank: Bank | None = None,
                 labels: Tensor | None = None):
        self.out, self.batch, self.epoch, self.bank, self.labels = out, batch, epoch, bank, labels
        self.diag: dict[str, Tensor] = {}  # diagnostics a term reports (diversity values)
        self._cache: dict = {}

    def cached(self, key, compute: Callable[[], object]):
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    @property
    def sims(self) -> Tensor:
        """S_nq = cos(v_n, w_q) of the batch (Eq. 3-5)."""
        return self.cached("sims", lambda: self.out["v_i"] @ self.out["w_i"].t())

    @property
    def bank_sims(self) -> tuple[Tensor, Tensor]:
        """Batch anchors against the opposite modality's bank: (v^I B_w^T, w^I B_v^T) (Eq. 6)."""
        return self.cached("bank_sims", lambda: (self.out["v_i"] @ self.bank.w.t(), self.out["w_i"] @ self.bank.v.t()))


class Term(nn.Module):
    batch_fields: tuple[str, ...] = ()
    needs_bank = False
    needs_labels = False

    def active(self, inputs: TermInputs) -> bool:
        return (inputs.bank is not None or not self.needs_bank) and (inputs.labels is not None or not self.needs_labels)


class Diversity(nn.Module):
    """Eq. 3's anchor diversities of the batch's images and captions, shared by L_DCL^I and M-DCL.

    `detach`: a weight, not a gradient path (our reading of Eq. 3); `with_bank`: with banks, the mean of
    the batch- and bank-level values (§3.3, Table 3 "MB")."""

    def __init__(self, eps: float, detach: bool, with_bank: bool):
        super().__init__()
        self.eps, self.detach, self.with_bank = eps, detach, with_bank

    def of(self, sims: Tensor, bank_sims: Tensor | None = None) -> Tensor:
        if self.detach:
            sims = sims.detach()
            bank_sims = bank_sims.detach() if bank_sims is not None else None
        div = diversity(sims, eps=self.eps)
        if bank_sims is not None and self.with_bank:
            div = (div + diversity(bank_sims, eps=self.eps)) / 2  # §3.3: average of batch- and bank-level values
        return div

    def forward(self, inputs: TermInputs) -> tuple[Tensor, Tensor]:
        def compute():
            bank_w, bank_v = inputs.bank_sims if inputs.bank is not None else (None, None)
            div_v, div_w = self.of(inputs.sims, bank_w), self.of(inputs.sims.t(), bank_v)
            inputs.diag["diversity_v"], inputs.diag["diversity_w"] = div_v.detach(), div_w.detach()
            return div_v, div_w
        return inputs.cached("diversity", compute)


class InstanceDCL(Term):
    """L_DCL^I = l(V, W) + l(W, V) on the batch (Eq. 5; Eq. 4 without diversity)."""

    def __init__(self, mu: float, gamma: float, positive: str, diversity: Diversity | None):
        super().__init__()
        self.mu, self.gamma, self.positive, self.diversity = mu, gamma, positive, diversity

    def forward(self, inputs: TermInputs) -> Tensor:
        div_v, div_w = self.diversity(inputs) if self.diversity is not None else (None, None)
        return dcl_bidirectional(inputs.sims, self.mu, self.gamma, div_v, div_w, self.positive)


class MemoryDCL(Term):
    """L_M-DCL (Eq. 6): batch anchors against the opposite modality's bank; the paired momentum key is the
    positive. With `mask_own_image`, bank entries of the anchor's own image are not negatives."""

    batch_fields = ("image_index",)
    needs_bank = True

    def __init__(self, mu: float, gamma: float, positive: str, diversity: Diversity | None, mask_own_image: bool):
        super().__init__()
        self.mu, self.gamma, self.positive, self.diversity = mu, gamma, positive, diversity
        self.mask_own_image = mask_own_image

    def forward(self, inputs: TermInputs) -> Tensor:
        out, bank = inputs.out, inputs.bank
        bank_w, bank_v = inputs.bank_sims
        div_v, div_w = self.diversity(inputs) if self.diversity is not None else (None, None)
        mask_w = mask_v = None
        if self.mask_own_image:
            own = inputs.batch["image_index"].to(bank.ids_w.device)[:, None]
            mask_w, mask_v = bank.ids_w[None, :] == own, bank.ids_v[None, :] == own
        pos_v, pos_w = (out["v_i"] * out["w_key"]).sum(-1), (out["w_i"] * out["v_key"]).sum(-1)
        settings = {"mu": self.mu, "gamma": self.gamma, "positive": self.positive}
        return dcl(bank_w, pos_sims=pos_v, div=div_v, neg_mask=mask_w, **settings) + \
            dcl(bank_v, pos_sims=pos_w, div=div_w, neg_mask=mask_v, **settings)


class ConceptDCL(Term):
    """L_DCL^C: Eq. 5 between the concept-level embeddings v^C, w^C, with batch-only diversity."""

    def __init__(self, mu: float, gamma: float, positive: str, diversity: Diversity):
        super().__init__()
        self.mu, self.gamma, self.positive, self.diversity = mu, gamma, positive, diversity

    def forward(self, inputs: TermInputs) -> Tensor:
        sims = inputs.out["v_c"] @ inputs.out["w_c"].t()
        return dcl_bidirectional(sims, self.mu, self.gamma, self.diversity.of(sims), self.diversity.of(sims.t()),
                                 self.positive)


class PGC(Term):
    """L_PGC (Eq. 7): v^C and w^C classified into the K k-means prototypes by the shared P^C."""

    needs_labels = True

    def __init__(self, num_prototypes: int, dim: int, start_epoch: int):
        super().__init__()
        self.classifier = PrototypeClassifier(num_prototypes, dim)  # P^C
        self.start_epoch = start_epoch

    def forward(self, inputs: TermInputs) -> Tensor:
        return pgc(self.classifier(inputs.out["v_c"]), self.classifier(inputs.out["w_c"]), inputs.labels)


class Triplet(Term):
    """The BTR baseline (Table 2 #1): VSE++ hinge, all negatives for `warmup_epochs`, then the hardest."""

    def __init__(self, margin: float, warmup_epochs: int):
        super().__init__()
        self.margin, self.warmup_epochs = margin, warmup_epochs

    def forward(self, inputs: TermInputs) -> Tensor:
        return triplet(inputs.sims, self.margin, hardest=inputs.epoch >= self.warmup_epochs)


class InfoNCE(Term):
    """The BIN baseline: bidirectional cross-entropy over the batch."""

    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = temperature

    def forward(self, inputs: TermInputs) -> Tensor:
        return infonce(inputs.sims, self.temperature)


class UTOBatch(Term):
    """USER's UTO over in-batch negatives, both directions, each pair's positive counted once."""

    def __init__(self, alpha: float, eps: float):
        super().__init__()
        self.alpha, self.eps = alpha, eps

    def forward(self, inputs: TermInputs) -> Tensor:
        sims = inputs.sims
        return uto_term(sims, alpha=self.alpha, eps=self.eps) + \
            uto_term(sims.t(), alpha=self.alpha, eps=self.eps, with_positive=False)


class UTOQueue(Term):
    """USER's UTO against the banks: the paired momentum key is the positive, one per direction."""

    needs_bank = True

    def __init__(self, alpha: float, eps: float):
        super().__init__()
        self.alpha, self.eps = alpha, eps

    def forward(self, inputs: TermInputs) -> Tensor:
        out = inputs.out
        bank_w, bank_v = inputs.bank_sims
        return uto_term(bank_w, (out["v_i"] * out["w_key"]).sum(-1), alpha=self.alpha, eps=self.eps) + \
            uto_term(bank_v, (out["w_i"] * out["v_key"]).sum(-1), alpha=self.alpha, eps=self.eps)
