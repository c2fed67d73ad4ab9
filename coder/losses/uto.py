"""USER's Unified Training Objective (UTO, USER).

One direction, anchors n with positive S_n+ and negatives S_nq:
    l_n = log(1 + sum_q exp(alpha (S_nq - eps))) / alpha - log(1 + relu(S_n+))
The batch term uses in-batch negatives in both directions and counts each pair's positive once (USER's
`lib/loss.py`: one -log(1 + relu(S_ii)) per pair); the queue term uses the paired momentum key as positive
and the memory-bank entries as negatives, one positive per direction; total = lambda_uto * batch + queue.
"""
from __future__ import annotations

import torch
from torch import Tensor


def uto_term(sims: Tensor, pos_sims: Tensor | None = None, alpha: float = 90.0, eps: float = 0.5,
             with_positive: bool = True) -> Tensor:
    """UTO for one direction, averaged over anchors (rows of `sims`).

    with_positive=False leaves out -log(1 + relu(S_pos)) (the batch term's second direction).

    sims (N, Q): anchor-candidate similarities. With `pos_sims` None, `sims` is square, the diagonal
    holds the positives and the off-diagonal entries are the negatives; with `pos_sims` (N,) given,
    every column of `sims` is a negative (queue term).
    """
    if sims.dim() != 2:
        raise ValueError(f"uto_term: sims must be 2-D (N, Q), got shape {tuple(sims.shape)}")
    if sims.dtype in (torch.float16, torch.bfloat16):
        sims = sims.float()  # the exp(90 x) sum needs float32 precision
    n = sims.size(0)
    logits = alpha * (sims - eps)
    if pos_sims is None:
        if sims.size(1) != n:
            raise ValueError(f"uto_term: without pos_sims, sims must be square, got shape {tuple(sims.shape)}")
        pos = sims.diagonal()
        diag = torch.eye(n, dtype=torch.bool, device=sims.device)
        logits = logits.masked_fill(diag, float("-inf"))  # positives are not negatives
    else:
        if pos_sims.shape != (n,):
            raise ValueError(f"uto_term: pos_sims must have shape ({n},), got {tuple(pos_sims.shape)}")
        pos = pos_sims.to(sims.dtype)
    # log(1 + sum exp(x)) as a log-sum-exp with a zero logit: stable and finite for any S in [-1, 1]
    zero = logits.new_zeros(n, 1)
    negative = torch.logsumexp(torch.cat([zero, logits], dim=1), dim=1) / alpha
    if not with_positive:
        return negative.mean()
    return (negative - torch.log1p(torch.relu(pos))).mean()


def uto(v: Tensor, w: Tensor, v_key: Tensor | None = None, w_key: Tensor | None = None,
             queue_v: Tensor | None = None, queue_w: Tensor | None = None, alpha: float = 90.0,
             eps: float = 0.5, lambda_uto: float = 20.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Total UTO = lambda_uto * batch + queue.

    v, w (B, F): L2-normalised image / caption embeddings of the batch (pair n is v[n], w[n]).
    v_key, w_key (B, F): momentum keys of the same pairs; queue_v, queue_w (K, F): memory banks of
    image / caption keys. The queue term is added only when all four are given.
    Returns (total, detached terms for logging).
    """
    if v.dim() != 2 or v.shape != w.shape:
        raise ValueError(f"uto: v and w must both be (B, F), got {tuple(v.shape)} and {tuple(w.shape)}")
    sims = v @ w.t()
    batch_i2t = uto_term(sims, alpha=alpha, eps=eps)
    batch_t2i = uto_term(sims.t(), alpha=alpha, eps=eps, with_positive=False)  # the pair's positive counted once
    batch = batch_i2t + batch_t2i
    terms = {"uto_batch_i2t": batch_i2t, "uto_batch_t2i": batch_t2i, "uto_batch": batch}
    total = lambda_uto * batch

    queue_inputs = {"v_key": v_key, "w_key": w_key, "queue_v": queue_v, "queue_w": queue_w}
    given = [name for name, t in queue_inputs.items() if t is not None]
    if given and len(given) != len(queue_inputs):
        missing = [name for name in queue_inputs if name not in given]
        raise ValueError(f"uto: the queue term needs v_key, w_key, queue_v and queue_w; missing {missing}")
    if given:
        for name in ("v_key", "w_key"):
            if queue_inputs[name].shape != v.shape:
                raise ValueError(f"uto: {name} must have shape {tuple(v.shape)}, "
                                 f"got {tuple(queue_inputs[name].shape)}")
        for name in ("queue_v", "queue_w"):
            if queue_inputs[name].dim() != 2 or queue_inputs[name].size(1) != v.size(1):
                raise ValueError(f"uto: {name} must have shape (K, {v.size(1)}), "
                                 f"got {tuple(queue_inputs[name].shape)}")
        # image anchors against the caption bank, positive = the paired caption's momentum key; and back
        queue_i2t = uto_term(v @ queue_w.t(), (v * w_key).sum(-1), alpha=alpha, eps=eps)
        queue_t2i = uto_term(w @ queue_v.t(), (w * v_key).sum(-1), alpha=alpha, eps=eps)
        queue = queue_i2t + queue_t2i
        terms.update({"uto_queue_i2t": queue_i2t, "uto_queue_t2i": queue_t2i, "uto_queue": queue})
        total = total + queue

    terms["uto_total"] = total
    return total, {name: t.detach() for name, t in terms.items()}
