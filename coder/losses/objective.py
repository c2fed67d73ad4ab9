"""The training objective: the terms of Eq. 8 (or a baseline / USER's UTO) composed from the `loss` config.

L = lambda L_DCL^I + L_M-DCL^I + L_DCL^C + L_PGC (Eq. 8), each weight a config key. The instance term can be
swapped for the baselines of the ablations (triplet, InfoNCE, implicit DCL) or for USER's UTO. The objective
sees plain tensors only: the model's embeddings and, with momentum encoders, a `Bank` of queue contents.
"""
from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

from .dcl import dcl, diversity
from .infonce import infonce
from .pgc import PrototypeClassifier, pgc
from .triplet import triplet
from .uto import uto


class Bank(NamedTuple):
    """The coupled memory banks B_v (image keys) and B_w (caption keys) with the image id of each entry."""

    v: Tensor
    w: Tensor
    ids_v: Tensor
    ids_w: Tensor


class Objective(nn.Module):
    """Holds the loss settings and the training-only parameters (the PGC classifier P^C)."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.loss = cfg["loss"]
        self.kind = self.loss["instance"]
        concept = cfg["model"]["concept"]["enabled"]
        self.use_concept_dcl = concept and self.loss["concept_weight"] > 0
        self.prototypes = None
        if concept and self.loss["pgc_weight"] > 0:
            self.prototypes = PrototypeClassifier(cfg["cluster"]["k"], cfg["model"]["embed_dim"])  # P^C, Eq. 7

    # ---------------------------------------------------------------------------------------- helpers
    def _diversity(self, sims: Tensor, bank_sims: Tensor | None) -> Tensor:
        """Eq. 3 for the anchors of `sims`' rows; with a bank, the mean of batch and bank estimates."""
        eps = self.loss["eps"]
        if self.loss["detach_diversity"]:
            sims = sims.detach()
            bank_sims = bank_sims.detach() if bank_sims is not None else None
        div = diversity(sims, eps=eps)
        if bank_sims is not None and self.loss["bank_diversity"]:
            div = (div + diversity(bank_sims, eps=eps)) / 2  # §3.3: average of batch- and bank-level values
        return div

    def _two_way(self, sims_v: Tensor, sims_w: Tensor, div_v: Tensor | None, div_w: Tensor | None,
                 pos_v: Tensor | None = None, pos_w: Tensor | None = None, mask_v: Tensor | None = None,
                 mask_w: Tensor | None = None) -> Tensor:
        """l(V -> W) + l(W -> V) (Eq. 4/5; Eq. 6 with positives `pos_*` and bank similarities)."""
        cfg = self.loss
        settings = {"mu": cfg["mu"], "gamma": cfg["gamma"], "positive": cfg["dcl_positive"]}
        return dcl(sims_v, pos_sims=pos_v, div=div_v, neg_mask=mask_v, **settings) + \
            dcl(sims_w, pos_sims=pos_w, div=div_w, neg_mask=mask_w, **settings)

    def _instance(self, sims: Tensor, div_v: Tensor, div_w: Tensor, epoch: int) -> Tensor:
        if self.kind == "triplet":
            return triplet(sims, self.loss["margin"], hardest=epoch >= self.loss["warmup_epochs"])
        if self.kind == "infonce":
            return infonce(sims, self.loss["temperature"])
        if self.kind == "dcl_implicit":  # Eq. 4
            return self._two_way(sims, sims.t(), None, None)
        return self._two_way(sims, sims.t(), div_v, div_w)  # Eq. 5

    def _memory(self, out: dict[str, Tensor], batch: dict, bank: Bank, bank_w: Tensor, bank_v: Tensor,
                div_v: Tensor | None, div_w: Tensor | None) -> Tensor:
        """Eq. 6, M-DCL: batch anchors against the opposite modality's bank; the paired momentum key is
        the positive."""
        mask_w = mask_v = None
        if self.loss["mask_own_image"]:
            own = batch["image_index"].to(bank.ids_w.device)[:, None]
            mask_w, mask_v = bank.ids_w[None, :] == own, bank.ids_v[None, :] == own
        pos_v = (out["v_i"] * out["w_key"]).sum(-1)
        pos_w = (out["w_i"] * out["v_key"]).sum(-1)
        return self._two_way(bank_w, bank_v, div_v, div_w, pos_v, pos_w, mask_w, mask_v)

    def _concept(self, out: dict[str, Tensor]) -> Tensor:
        """L_DCL^C: DCL between concept-level embeddings, batch-only diversity (Eq. 5 on v^C, w^C)."""
        c_sims = out["v_c"] @ out["w_c"].t()
        return self._two_way(c_sims, c_sims.t(), self._diversity(c_sims, None), self._diversity(c_sims.t(), None))

    def _uto(self, out: dict[str, Tensor], bank: Bank | None) -> tuple[Tensor, dict, dict]:
        cfg = self.loss
        total, terms = uto(out["v_i"], out["w_i"], out.get("v_key"), out.get("w_key"),
                                bank.v if bank is not None else None, bank.w if bank is not None else None,
                                alpha=cfg["uto_alpha"], eps=cfg["uto_eps"], lambda_uto=cfg["uto_lambda"])
        return total, terms, {}

    # -------------------------------------------------------------------------------------------- total
    def forward(self, out: dict[str, Tensor], batch: dict[str, Tensor], epoch: int, bank: Bank | None = None,
                labels: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """Total loss, the terms before weighting (for logging), and diagnostics (diversity values)."""
        if self.kind == "uto":
            return self._uto(out, bank)
        cfg = self.loss
        v, w = out["v_i"], out["w_i"]
        sims = v @ w.t()  # S_nq = cos(v_n, w_q)
        bank_w = bank_v = None  # similarities of batch anchors to the opposite modality's bank
        if bank is not None:
            bank_w, bank_v = v @ bank.w.t(), w @ bank.v.t()
        diag: dict[str, Tensor] = {}
        div_v = div_w = None
        if self.kind == "dcl":
            div_v, div_w = self._diversity(sims, bank_w), self._diversity(sims.t(), bank_v)
            diag["diversity_v"], diag["diversity_w"] = div_v.detach(), div_w.detach()

        terms = {"instance": self._instance(sims, div_v, div_w, epoch)}
        weights = {"instance": cfg["instance_weight"]}
        if bank is not None and cfg["memory_weight"] > 0:
            terms["memory"], weights["memory"] = self._memory(out, batch, bank, bank_w, bank_v, div_v, div_w), \
                cfg["memory_weight"]
        if self.use_concept_dcl:
            terms["concept"], weights["concept"] = self._concept(out), cfg["concept_weight"]
        if self.prototypes is not None and labels is not None:  # Eq. 7
            terms["pgc"] = pgc(self.prototypes(out["v_c"]), self.prototypes(out["w_c"]), labels)
            weights["pgc"] = cfg["pgc_weight"]
        total = sum(weights[name] * term for name, term in terms.items())  # Eq. 8
        return total, terms, diag
