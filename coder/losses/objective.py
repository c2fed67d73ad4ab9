"""The training objective: the terms of Eq. 8 (or a baseline / USER's UTO) composed from the `loss` config.

L = lambda L_DCL^I + L_M-DCL^I + L_DCL^C + L_PGC (Eq. 8), each weight a config key. The instance term can be
swapped for the baselines of the ablations (triplet, InfoNCE, implicit DCL) or for USER's UTO.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .infonce import infonce
from .triplet import triplet


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
            from .pgc import PrototypeClassifier

            self.prototypes = PrototypeClassifier(cfg["cluster"]["k"], cfg["model"]["embed_dim"])  # P^C, Eq. 7

    # ---------------------------------------------------------------------------------------- diversity
    def _diversity(self, sims: Tensor, bank_sims: Tensor | None) -> Tensor | None:
        """Eq. 3 for the anchors of `sims`' rows; with a bank, the mean of batch and bank estimates."""
        if self.kind != "dcl":
            return None
        from .dcl import diversity

        eps = self.loss["eps"]
        if self.loss["detach_diversity"]:
            sims = sims.detach()
            bank_sims = bank_sims.detach() if bank_sims is not None else None
        div = diversity(sims, eps=eps)
        if bank_sims is not None and self.loss["bank_diversity"]:
            div = (div + diversity(bank_sims, eps=eps)) / 2  # §3.3: average of batch- and bank-level values
        return div

    # -------------------------------------------------------------------------------------------- terms
    def forward(self, out: dict[str, Tensor], batch: dict[str, Tensor], epoch: int, queues=None,
                labels: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """Total loss, the weighted-before terms for logging, and diagnostics (diversity values)."""
        terms: dict[str, Tensor] = {}
        diag: dict[str, Tensor] = {}
        v, w = out["v_i"], out["w_i"]
        sims = v @ w.t()  # S_nq = cos(v_n, w_q)
        cfg = self.loss
        total = sims.new_zeros(())

        if self.kind == "uto":
            from .uto import uto_loss

            qv, qw = (queues if queues is not None else (None, None))
            uto, parts = uto_loss(v, w, out.get("v_key"), out.get("w_key"),
                                  qv.features if qv is not None else None, qw.features if qw is not None else None,
                                  alpha=cfg["uto_alpha"], eps=cfg["uto_eps"], lambda_uto=cfg["uto_lambda"])
            terms.update(parts)
            return uto, terms, diag

        bank_v = bank_w = None  # similarities of batch anchors to the opposite modality's bank
        if queues is not None:
            qv, qw = queues
            bank_w, bank_v = v @ qw.features.t(), w @ qv.features.t()
        div_v, div_w = self._diversity(sims, bank_w), self._diversity(sims.t(), bank_v)
        if div_v is not None:
            diag["diversity_v"], diag["diversity_w"] = div_v.detach(), div_w.detach()

        if self.kind == "triplet":
            term = triplet(sims, cfg["margin"], hardest=epoch >= cfg["warmup_epochs"])
        elif self.kind == "infonce":
            term = infonce(sims, cfg["temperature"])
        else:  # Eq. 4 (dcl_implicit, div None) or Eq. 5 (dcl)
            from .dcl import dcl

            term = dcl(sims, mu=cfg["mu"], gamma=cfg["gamma"], div=div_v) + \
                dcl(sims.t(), mu=cfg["mu"], gamma=cfg["gamma"], div=div_w)
        terms["instance"] = term
        total = total + cfg["instance_weight"] * term

        if queues is not None and cfg["memory_weight"] > 0:  # Eq. 6, M-DCL: batch anchors vs the banks
            from .dcl import dcl

            qv, qw = queues
            mask_w = mask_v = None
            if cfg["mask_own_image"]:
                own = batch["image_index"].to(v.device)[:, None]
                mask_w, mask_v = qw.ids[None, :] == own, qv.ids[None, :] == own
            pos_v = (v * out["w_key"]).sum(-1)  # the paired momentum key is the positive
            pos_w = (w * out["v_key"]).sum(-1)
            term = dcl(bank_w, pos_sims=pos_v, mu=cfg["mu"], gamma=cfg["gamma"], div=div_v, neg_mask=mask_w) + \
                dcl(bank_v, pos_sims=pos_w, mu=cfg["mu"], gamma=cfg["gamma"], div=div_w, neg_mask=mask_v)
            terms["memory"] = term
            total = total + cfg["memory_weight"] * term

        if self.use_concept_dcl:  # L_DCL^C: concept-level DCL, batch-only diversity
            from .dcl import dcl

            c_sims = out["v_c"] @ out["w_c"].t()
            cdiv_v, cdiv_w = self._diversity(c_sims, None), self._diversity(c_sims.t(), None)
            term = dcl(c_sims, mu=cfg["mu"], gamma=cfg["gamma"], div=cdiv_v) + \
                dcl(c_sims.t(), mu=cfg["mu"], gamma=cfg["gamma"], div=cdiv_w)
            terms["concept"] = term
            total = total + cfg["concept_weight"] * term

        if self.prototypes is not None and labels is not None:  # Eq. 7
            from .pgc import pgc_loss

            term = pgc_loss(self.prototypes(out["v_c"]), self.prototypes(out["w_c"]), labels)
            terms["pgc"] = term
            total = total + cfg["pgc_weight"] * term
        return total, terms, diag
