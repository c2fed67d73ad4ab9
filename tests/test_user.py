"""USER building blocks: SGE / CGE injection modules and the UTO loss (USER)."""
import math

import pytest
import torch
import torch.nn.functional as F

from coder.losses import uto, uto_term
from coder.models.user import ClipGuidedEnhancement, SelfGuidedEnhancement, inject_global, injection_weights

ALPHA, EPS = 90.0, 0.5


def slow_uto_term(sims, pos_sims=None, alpha=ALPHA, eps=EPS):
    """Direct float64 loop: mean_n log(1 + sum_neg exp(alpha (S - eps))) / alpha - log(1 + relu(S_pos))."""
    sims = sims.double().tolist()
    total = 0.0
    for n, row in enumerate(sims):
        if pos_sims is None:
            pos = row[n]
            negs = [s for q, s in enumerate(row) if q != n]
        else:
            pos = float(pos_sims[n])
            negs = row
        neg_sum = sum(math.exp(alpha * (s - eps)) for s in negs)
        total += math.log(1.0 + neg_sum) / alpha - math.log(1.0 + max(pos, 0.0))
    return total / len(sims)


def unit(*shape, dtype=torch.float64):
    return F.normalize(torch.randn(*shape, dtype=dtype), dim=-1)


def test_uto_term_batch_form_matches_loop():
    torch.manual_seed(0)
    for n in (2, 7):
        sims = torch.rand(n, n, dtype=torch.float64) * 2 - 1  # both signs: relu and large exps exercised
        assert uto_term(sims).item() == pytest.approx(slow_uto_term(sims), rel=1e-10, abs=1e-12)


def test_uto_term_queue_form_matches_loop():
    torch.manual_seed(1)
    sims = torch.rand(5, 11, dtype=torch.float64) * 2 - 1
    pos = torch.rand(5, dtype=torch.float64) * 2 - 1
    assert uto_term(sims, pos).item() == pytest.approx(slow_uto_term(sims, pos), rel=1e-10, abs=1e-12)
    # different alpha / eps are honoured
    got = uto_term(sims, pos, alpha=10.0, eps=0.2).item()
    assert got == pytest.approx(slow_uto_term(sims, pos, alpha=10.0, eps=0.2), rel=1e-10, abs=1e-12)


def test_uto_term_finite_at_extreme_similarities():
    sims = torch.tensor([[1.0, 1.0, -1.0], [1.0, -1.0, 1.0], [-1.0, -1.0, 1.0]], requires_grad=True)
    loss = uto_term(sims)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(sims.grad).all()
    assert loss.item() == pytest.approx(slow_uto_term(sims.detach()), rel=1e-5)
    half = sims.detach().bfloat16().requires_grad_()
    assert torch.isfinite(uto_term(half))


def test_uto_term_rejects_bad_shapes():
    with pytest.raises(ValueError, match="square"):
        uto_term(torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"pos_sims must have shape \(3,\)"):
        uto_term(torch.zeros(3, 4), torch.zeros(4))


def test_uto_loss_combines_batch_and_queue_terms():
    torch.manual_seed(2)
    b, k, d = 6, 13, 8
    v, w, v_key, w_key = (unit(b, d) for _ in range(4))
    queue_v, queue_w = unit(k, d), unit(k, d)
    lam = 20.0
    total, terms = uto(v, w, v_key, w_key, queue_v, queue_w, lambda_uto=lam)

    sims = v @ w.t()
    # USER's batch term: both directions' negatives, one -log(1 + relu(S_ii)) per pair
    batch = slow_uto_term(sims) + slow_uto_term(sims.t()) + \
        sum(math.log1p(max(float(sims[i, i]), 0.0)) for i in range(b)) / b
    queue = (slow_uto_term(v @ queue_w.t(), (v * w_key).sum(-1))
             + slow_uto_term(w @ queue_v.t(), (w * v_key).sum(-1)))
    assert terms["uto_batch"].item() == pytest.approx(batch, rel=1e-10)
    assert terms["uto_queue"].item() == pytest.approx(queue, rel=1e-10)
    assert total.item() == pytest.approx(lam * batch + queue, rel=1e-10)

    batch_only, batch_terms = uto(v, w, lambda_uto=1.0)
    assert batch_only.item() == pytest.approx(batch, rel=1e-10)
    assert "uto_queue" not in batch_terms
    with pytest.raises(ValueError, match="queue_w"):
        uto(v, w, v_key, w_key, queue_v=queue_v)


def test_uto_loss_gradients_reach_both_modalities():
    torch.manual_seed(3)
    v = unit(4, 8, dtype=torch.float32).requires_grad_()
    w = unit(4, 8, dtype=torch.float32).requires_grad_()
    total, _ = uto(v, w, unit(4, 8, dtype=torch.float32), unit(4, 8, dtype=torch.float32),
                        unit(9, 8, dtype=torch.float32), unit(9, 8, dtype=torch.float32))
    total.backward()
    assert v.grad.abs().sum() > 0 and w.grad.abs().sum() > 0


def test_injection_matches_loop():
    torch.manual_seed(4)
    regions = torch.randn(3, 5, 4, dtype=torch.float64)
    g = unit(3, 4)
    lam = 0.7
    out = inject_global(regions, g, lam)
    for i in range(3):
        logits = [lam * float(regions[i, k] @ g[i]) for k in range(5)]
        top = max(logits)
        soft = [math.exp(x - top) for x in logits]
        soft = [s / sum(soft) for s in soft]
        norm = math.sqrt(sum(s * s for s in soft))
        for k in range(5):
            expected = regions[i, k] + (soft[k] / norm) * g[i]
            torch.testing.assert_close(out[i, k], expected, rtol=1e-12, atol=1e-12)
    assert torch.allclose(injection_weights(regions, g, lam).norm(dim=1), torch.ones(3, dtype=torch.float64))


def test_sge_attention_sums_to_one_and_shape_is_kept():
    torch.manual_seed(5)
    sge = SelfGuidedEnhancement(region_dim=16, num_regions=6)
    regions = torch.randn(4, 6, 16)
    g, a = sge.self_attention(regions)
    assert a.shape == (4, 6) and (a >= 0).all()
    torch.testing.assert_close(a.sum(dim=1), torch.ones(4))
    torch.testing.assert_close(g.norm(dim=1), torch.ones(4))
    out = sge(regions, torch.full((4,), 6))
    assert out.shape == regions.shape
    out.sum().backward()
    assert sge.attention_logit.weight.grad.abs().sum() > 0  # the attention is trained through g

    sge.eval()  # deterministic: the injected vector is g = L2norm(sum_k a_k o_k)
    g, a = sge.self_attention(regions)
    torch.testing.assert_close(g, F.normalize((a.unsqueeze(-1) * regions).sum(1), dim=-1))
    torch.testing.assert_close(sge(regions), inject_global(regions, g))


def test_sge_attention_offset_has_no_effect_and_old_checkpoints_load():
    torch.manual_seed(6)
    sge = SelfGuidedEnhancement(region_dim=16, num_regions=6).eval()
    regions = torch.randn(4, 6, 16)
    _, a = sge.self_attention(regions)
    state = {**sge.state_dict(), "attention_logit.bias": torch.tensor([3.0])}  # a checkpoint with the offset
    fresh = SelfGuidedEnhancement(region_dim=16, num_regions=6).eval()
    fresh.load_state_dict(state)  # strict: only the offset without effect may be dropped
    torch.testing.assert_close(fresh.self_attention(regions)[1], a)
    shifted = torch.softmax(torch.log(a) + 3.0, dim=1)  # why there is no bias: the softmax cancels it
    torch.testing.assert_close(shifted, a)


def test_sge_rejects_variable_region_counts():
    sge = SelfGuidedEnhancement(region_dim=16, num_regions=6)
    with pytest.raises(ValueError, match="expects exactly 6 regions per image, got 5"):
        sge(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match=r"got lengths \[4\]"):
        sge(torch.randn(2, 6, 16), torch.tensor([6, 4]))
    with pytest.raises(ValueError, match=r"\(B, L, 16\)"):
        sge(torch.randn(2, 6, 8))


def test_cge_output_depends_on_regions_and_clip_only():
    torch.manual_seed(6)
    cge = ClipGuidedEnhancement(clip_dim=12, embed_dim=10, region_dim=16)
    cge.train()
    cge(torch.randn(8, 5, 16), torch.randn(8, 12))  # give BatchNorm non-trivial running statistics
    cge.eval()
    regions, clip, other_clip = torch.randn(3, 5, 16), torch.randn(3, 12), torch.randn(3, 12)

    out = cge(regions, clip)
    assert out.shape == regions.shape
    torch.testing.assert_close(cge(regions.clone(), clip.clone()), out, rtol=0, atol=0)
    assert not torch.allclose(cge(regions, other_clip), out)
    # every region moves along the one vector derived from the CLIP feature
    g = cge.global_vector(clip)
    torch.testing.assert_close(out, inject_global(regions, g))
    delta = F.normalize(out - regions, dim=-1)
    torch.testing.assert_close(delta, g.unsqueeze(1).expand_as(delta))

    clip_leaf = clip.clone().requires_grad_()
    cge(regions, clip_leaf).pow(2).sum().backward()
    assert clip_leaf.grad.abs().sum() > 0


def test_cge_rejects_bad_clip_shape():
    cge = ClipGuidedEnhancement(clip_dim=12, embed_dim=10, region_dim=16)
    with pytest.raises(ValueError, match=r"shape \(2, 12\), got \(2, 8\)"):
        cge(torch.randn(2, 5, 16), torch.randn(2, 8))


def test_the_objectives_uto_terms_are_the_oracle_checked_uto():
    """Training runs UTO as two Eq. 8 terms (coder/step.py); weighted lambda (batch) and 1 (queue) they
    equal `uto`, which the float64 loops above check."""
    from coder.config import load_config
    from coder.losses import Bank
    from coder.step import build_objective

    g = torch.Generator().manual_seed(5)
    v, w, v_key, w_key = (torch.nn.functional.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=1)
                          for _ in range(4))
    queue_v, queue_w = (torch.nn.functional.normalize(torch.randn(10, 8, generator=g, dtype=torch.float64), dim=1)
                        for _ in range(2))
    cfg = load_config("configs/f30k_user.yaml", ["model.embed_dim=8"])
    objective = build_objective(cfg).double()
    ids = torch.zeros(10, dtype=torch.long)
    total, terms, _ = objective({"v_i": v, "w_i": w, "v_key": v_key, "w_key": w_key},
                                {"index": torch.arange(6), "image_index": torch.arange(6)}, 0,
                                Bank(queue_v, queue_w, ids, ids))
    expected, _ = uto(v, w, v_key, w_key, queue_v, queue_w, lambda_uto=cfg["loss"]["instance_weight"])
    assert set(terms) == {"instance", "memory"}
    torch.testing.assert_close(total, expected, rtol=1e-12, atol=1e-12)
