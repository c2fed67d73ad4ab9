"""Diversity (Eq. 3) and DCL-I / DCL / M-DCL (Eq. 4-6) against slow float64 re-derivations."""

import math

import pytest
import torch

from coder.losses.dcl import dcl, dcl_bidirectional, diversity

MU, GAMMA, EPS = 0.1, 0.3, 0.1


def random_sims(n: int, q: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, q, generator=gen, dtype=torch.float64) * 2 - 1


def random_mask(n: int, q: int, seed: int, p: float = 0.2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, q, generator=gen) < p


# ---- slow references, one anchor at a time, straight from the paper ----------------------------

def negatives_of(sims, n, square, excluded):
    """Python list of the negatives of anchor n (square: q != n; bank: every column)."""
    out = []
    for q in range(sims.shape[1]):
        if square and q == n:
            continue
        if excluded is not None and bool(excluded[n, q]):
            continue
        out.append(float(sims[n, q]))
    return out


def ref_diversity(sims, excluded=None, eps=EPS, normalize=True, square=True):
    divs = []
    for n in range(sims.shape[0]):
        negs = negatives_of(sims, n, square, excluded)
        e_s = sum(negs) / len(negs) if negs else 0.0
        e_s2 = sum(s * s for s in negs) / len(negs) if negs else 0.0
        sd = math.sqrt(max(e_s2 - e_s**2, 1e-12))  # Eq. 3
        divs.append(1.0 / (1.0 / (1.0 + math.exp(-eps / sd))))
    if normalize:
        top = max(divs)
        divs = [d / top for d in divs]
    return torch.tensor(divs, dtype=torch.float64)


def ref_dcl(sims, pos_sims=None, mu=MU, gamma=GAMMA, div=None, neg_mask=None, positive="paper"):
    """Eq. 4-6 by loops; positive="unscaled" keeps mu off log(1 + S_pos)."""
    total = 0.0
    for n in range(sims.shape[0]):
        temp = mu * (1.0 if div is None else float(div[n]))
        negs = negatives_of(sims, n, pos_sims is None, neg_mask)
        pos = float(sims[n, n]) if pos_sims is None else float(pos_sims[n])
        pull = math.log(pos + 1) if positive == "unscaled" else mu * math.log(pos + 1)
        total += mu * math.log(sum(math.exp((s - gamma) / temp) for s in negs) + 1) - pull
    return total / sims.shape[0]


# ---- diversity ---------------------------------------------------------------------------------

def test_diversity_square_matches_eq3():
    sims = random_sims(7, 7, 0)
    assert torch.allclose(diversity(sims), ref_diversity(sims), rtol=1e-10, atol=1e-12)
    raw = diversity(sims, normalize=False)
    assert torch.allclose(raw, ref_diversity(sims, normalize=False), rtol=1e-10)
    assert ((raw >= 1) & (raw <= 2)).all()  # 1 / sigmoid of a positive number


def test_diversity_bank_form_uses_every_column():
    sims = random_sims(5, 12, 1)
    expected = ref_diversity(sims, square=False)
    assert torch.allclose(diversity(sims), expected, rtol=1e-10)
    assert diversity(sims).max() == 1.0


def test_diversity_pos_mask_excludes_entries():
    sims = random_sims(6, 9, 2)
    mask = random_mask(6, 9, 3, p=0.3)
    expected = ref_diversity(sims, excluded=mask, square=False)
    assert torch.allclose(diversity(sims, pos_mask=mask), expected, rtol=1e-10)
    # for a square matrix an explicit pos_mask replaces the diagonal default
    square = random_sims(6, 6, 4)
    eye = torch.eye(6, dtype=torch.bool)
    assert torch.allclose(diversity(square, pos_mask=eye), diversity(square), rtol=1e-12)
    assert not torch.allclose(diversity(square, pos_mask=torch.zeros_like(eye)), diversity(square))


def test_diversity_low_spread_means_low_div():
    gen = torch.Generator().manual_seed(5)
    sims = 0.5 + 0.3 * (torch.rand(4, 20, generator=gen, dtype=torch.float64) - 0.5)
    sims[0] = 0.5 + 0.001 * (torch.rand(20, generator=gen, dtype=torch.float64) - 0.5)  # flat row
    div = diversity(sims)
    assert int(div.argmin()) == 0  # low SD -> low diversity -> sharper temperature mu * div
    assert math.isclose(float(diversity(sims, normalize=False)[0]), 1.0, rel_tol=1e-6)


def test_diversity_gradcheck_and_half_compute():
    sims = random_sims(5, 8, 6).requires_grad_()
    assert torch.autograd.gradcheck(lambda s: diversity(s), (sims,))
    assert diversity(sims.detach().half()).dtype == torch.float32


# ---- dcl ---------------------------------------------------------------------------------------

def test_dcl_implicit_eq4_square():
    sims = random_sims(8, 8, 10)
    assert math.isclose(float(dcl(sims)), ref_dcl(sims), rel_tol=1e-10)
    other = dcl(sims, mu=0.05, gamma=0.1)
    assert math.isclose(float(other), ref_dcl(sims, mu=0.05, gamma=0.1), rel_tol=1e-10)


def test_dcl_explicit_eq5_square():
    sims = random_sims(8, 8, 11)
    div = diversity(sims)
    assert math.isclose(float(dcl(sims, div=div)), ref_dcl(sims, div=ref_diversity(sims)), rel_tol=1e-10)
    both = dcl_bidirectional(sims, div_rows=div, div_cols=diversity(sims.t()))
    expected = ref_dcl(sims, div=ref_diversity(sims)) + ref_dcl(sims.t(), div=ref_diversity(sims.t()))
    assert math.isclose(float(both), expected, rel_tol=1e-10)


@pytest.mark.parametrize("positive", ["paper", "unscaled"])
def test_dcl_positive_forms_match_loops(positive):
    sims, bank, pos = random_sims(8, 8, 31), random_sims(6, 15, 32), random_sims(1, 6, 33)[0]
    div = diversity(sims)
    got = dcl(sims, div=div, positive=positive)
    assert math.isclose(float(got), ref_dcl(sims, div=ref_diversity(sims), positive=positive), rel_tol=1e-10)
    got = dcl(bank, pos_sims=pos, positive=positive)
    assert math.isclose(float(got), ref_dcl(bank, pos_sims=pos, positive=positive), rel_tol=1e-10)
    # the two forms differ by exactly (1 - mu) * mean log(1 + S_pos)
    gap = float(dcl(sims, positive="paper") - dcl(sims, positive="unscaled"))
    assert math.isclose(gap, (1 - MU) * float(torch.log1p(sims.diagonal()).mean()), rel_tol=1e-10)
    with pytest.raises(ValueError, match="positive must be one of"):
        dcl(sims, positive="scaled")


def test_mdcl_eq6_bank_form():
    sims, pos = random_sims(6, 15, 12), random_sims(1, 6, 13)[0]
    assert math.isclose(float(dcl(sims, pos_sims=pos)), ref_dcl(sims, pos_sims=pos), rel_tol=1e-10)
    div = 0.5 * (random_sims(1, 6, 14)[0].abs() + 1)
    assert math.isclose(float(dcl(sims, pos_sims=pos, div=div)), ref_dcl(sims, pos, div=div), rel_tol=1e-10)


def test_dcl_neg_mask():
    sims, pos = random_sims(6, 15, 20), random_sims(1, 6, 21)[0]
    mask = random_mask(6, 15, 22, p=0.3)
    got = dcl(sims, pos_sims=pos, neg_mask=mask)
    assert math.isclose(float(got), ref_dcl(sims, pos, neg_mask=mask), rel_tol=1e-10)
    square = random_sims(7, 7, 23)
    smask = random_mask(7, 7, 24, p=0.3)
    div = diversity(square)
    got = dcl(square, div=div, neg_mask=smask)
    assert math.isclose(float(got), ref_dcl(square, div=div, neg_mask=smask), rel_tol=1e-10)
    # all negatives masked: only the positive term is left
    all_masked = dcl(sims, pos_sims=pos, neg_mask=torch.ones(6, 15, dtype=torch.bool))
    assert math.isclose(float(all_masked), float(-MU * torch.log1p(pos).mean()), rel_tol=1e-10)


def test_dcl_gradcheck_float64():
    sims = random_sims(5, 5, 30).requires_grad_()
    div = diversity(sims.detach())
    assert torch.autograd.gradcheck(lambda s: dcl(s, div=div), (sims,))
    bank = random_sims(4, 9, 31).requires_grad_()
    pos = (random_sims(1, 4, 32)[0] * 0.9).requires_grad_()
    bdiv = (diversity(bank.detach()) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda s, p, d: dcl(s, pos_sims=p, div=d), (bank, pos, bdiv))


def test_detached_diversity_carries_no_gradient():
    sims = random_sims(6, 6, 40).requires_grad_()
    (dcl(sims, div=diversity(sims).detach())).backward()
    grad_detached = sims.grad.clone()
    sims.grad = None
    (dcl(sims, div=diversity(sims))).backward()
    grad_attached = sims.grad.clone()
    # the detached path equals differentiating with div as a constant
    constant = sims.detach().clone().requires_grad_()
    dcl(constant, div=diversity(sims.detach())).backward()
    assert torch.allclose(grad_detached, constant.grad, rtol=1e-12)
    assert not torch.allclose(grad_detached, grad_attached)  # attached div adds a gradient path
    div = diversity(sims)
    assert div.requires_grad and not div.detach().requires_grad


def test_larger_temperature_changes_only_that_anchor():
    sims = random_sims(6, 6, 50)
    div = diversity(sims)
    bigger = div.clone()
    bigger[2] = 2.0 * bigger[2]
    grads = []
    for d in (div, bigger):
        s = sims.clone().requires_grad_()
        dcl(s, div=d).backward()
        grads.append(s.grad)
    rows = torch.arange(6) != 2
    assert torch.equal(grads[0][rows], grads[1][rows])
    assert not torch.allclose(grads[0][2], grads[1][2])
    # and the loss moved by exactly that anchor's term change / N
    change = float(dcl(sims, div=bigger) - dcl(sims, div=div))

    def negative_term(d):
        negatives = [float(sims[2, q]) for q in range(6) if q != 2]
        return MU * math.log(1 + sum(math.exp((s - GAMMA) / (MU * float(d))) for s in negatives))

    assert math.isclose(change, (negative_term(bigger[2]) - negative_term(div[2])) / 6, rel_tol=1e-9)


@pytest.mark.parametrize("case", ["identical", "plus_minus_one", "batch_of_two", "fp16", "bf16"])
def test_dcl_edge_cases_finite(case):
    if case == "identical":  # all embeddings equal: every S = 1, SD -> 0
        sims = torch.ones(5, 5, dtype=torch.float32)
    elif case == "plus_minus_one":
        sims = torch.where(random_mask(6, 6, 60, p=0.5), 1.0, -1.0)
        sims.fill_diagonal_(-1.0)
    elif case == "batch_of_two":
        sims = random_sims(2, 2, 61).float()
    elif case == "fp16":
        sims = random_sims(6, 6, 62).half()
    else:
        sims = random_sims(6, 6, 63).bfloat16()
    sims = sims.requires_grad_()
    div = diversity(sims).detach()
    assert torch.isfinite(div).all()
    loss = dcl(sims, div=div) + dcl(sims) + dcl(sims, pos_sims=sims.diagonal(), div=div)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(sims.grad).all()


def test_bf16_autocast_close_to_fp32():
    gen = torch.Generator().manual_seed(70)
    images = torch.nn.functional.normalize(torch.randn(16, 32, generator=gen), dim=1)
    texts = torch.nn.functional.normalize(images + 0.5 * torch.randn(16, 32, generator=gen), dim=1)
    reference = dcl(images @ texts.t(), div=diversity(images @ texts.t()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sims = images @ texts.t()
        assert sims.dtype == torch.bfloat16
        loss = dcl(sims, div=diversity(sims).detach())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert math.isclose(float(loss), float(reference), rel_tol=0.03, abs_tol=0.01)


def test_bad_shapes_raise_clear_errors():
    with pytest.raises(ValueError, match="not square"):
        dcl(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="pos_sims"):
        dcl(torch.zeros(3, 4), pos_sims=torch.zeros(4))
    with pytest.raises(ValueError, match="div"):
        dcl(torch.zeros(3, 3), div=torch.ones(2))
    with pytest.raises(ValueError, match="neg_mask"):
        dcl(torch.zeros(3, 3), neg_mask=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="2-D"):
        diversity(torch.zeros(3))
