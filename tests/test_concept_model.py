"""Concept branch: adjacency (CVSE's graph), GCN (§3.2), Eq. 2 query, Eq. 7 PGC loss."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from coder.losses.pgc import PrototypeClassifier, pgc
from coder.models.concept import ConceptGCN, ConceptQuery, normalized_adjacency

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "cvse_concepts"


def random_stats(g: int, n_captions: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Counts and co-occurrence of g words in random captions (word frequencies vary)."""
    rng = np.random.default_rng(seed)
    incidence = rng.random((n_captions, g)) < rng.uniform(0.02, 0.6, size=g)
    both = incidence.T.astype(np.int64) @ incidence.astype(np.int64)
    counts = np.diagonal(both).copy()
    np.fill_diagonal(both, 0)
    return counts, both


def adjacency_loop(counts: np.ndarray, cooc: np.ndarray) -> np.ndarray:
    """The adjacency re-derived element by element in float64."""
    g = len(counts)
    b = np.zeros((g, g))
    for i in range(g):
        for j in range(g):
            p = cooc[i, j] / max(counts[i], 1)
            b[i, j] = 1.0 if 5.0 ** (p - 0.02) - 5.0 ** (-0.02) >= 0.3 else 0.0
    col = [sum(b[i, j] for i in range(g)) for j in range(g)]
    a = np.zeros((g, g))
    for i in range(g):
        for j in range(g):
            a[i, j] = 0.25 * b[i, j] / (col[j] + 1e-6) + (1.0 if i == j else 0.0)
    d = [sum(a[i, j] for j in range(g)) ** -0.5 for i in range(g)]
    out = np.zeros((g, g))
    for i in range(g):
        for j in range(g):
            out[i, j] = d[i] * a[j, i] * d[j]  # (D A^T D)_ij
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adjacency_matches_loop(seed: int):
    counts, cooc = random_stats(25, 200, seed)
    counts[3] = 0  # a concept in no caption
    cooc[3, :] = cooc[:, 3] = 0
    got = normalized_adjacency(counts, cooc)
    assert got.dtype == torch.float32 and got.shape == (25, 25)
    want = adjacency_loop(counts, cooc)
    assert 0 < (want > 0).sum() - 25  # some off-diagonal edges exist, so the test is not trivial
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(normalized_adjacency(torch.from_numpy(counts), torch.from_numpy(cooc)), got)


def test_adjacency_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(g,\) and cooccurrence \(g, g\)"):
        normalized_adjacency(np.ones(3), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="non-negative"):
        normalized_adjacency(np.ones(2), -np.ones((2, 2)))


def load_reference(name: str):
    path = REFERENCE / f"{name}_concepts.npz"
    if not path.is_file():
        pytest.skip(f"needs reference statistics outside the repository (../shared/reference/cvse_concepts/): "
                    f"no {path}")
    return np.load(path, allow_pickle=False)


@pytest.mark.parametrize("name", ["f30k", "coco"])
def test_adjacency_on_real_statistics(name: str):
    ref = load_reference(name)
    counts, cooc = ref["counts"], ref["adj_all"]
    a_hat = normalized_adjacency(counts, cooc).double()
    assert a_hat.shape == (300, 300) and torch.isfinite(a_hat).all()
    assert (torch.diagonal(a_hat) > 0).all() and (a_hat >= 0).all()
    # P(j|i) is not symmetric, so neither is A_hat: the formula gives D A^T D, not a symmetric matrix.
    assert not torch.allclose(a_hat, a_hat.T)
    # Undo D. C has a zero diagonal, so A_ii = 1 and diag(A_hat)_i = d_i^2: D is read off the diagonal,
    # A = (D^-1 A_hat D^-1)^T, and rowsum(A) must give D back.
    d = torch.diagonal(a_hat).sqrt()
    a = (a_hat / (d[:, None] * d[None, :])).T
    np.testing.assert_allclose(a.sum(1).pow(-0.5), d, rtol=1e-5)
    np.testing.assert_allclose(torch.diagonal(a), 1.0, rtol=1e-5)
    # B' = A - I: each column's edges carry equal weight 0.25 / (edges in the column), summing to 0.25.
    b = a - torch.eye(300, dtype=a.dtype)
    b[b.abs() < 1e-6] = 0.0
    col_sum, col_edges = b.sum(0), (b > 0).sum(0)
    has_edges = col_edges > 0
    assert has_edges.sum() > 50  # real concepts co-occur (93 of 300 columns for F30K)
    np.testing.assert_allclose(col_sum[has_edges], 0.25, rtol=1e-4)
    col_max = b.max(0).values[has_edges]
    np.testing.assert_allclose(col_max, 0.25 / col_edges[has_edges], rtol=1e-4)


@pytest.mark.parametrize("name", ["f30k", "coco"])
def test_gcn_on_real_glove_rows(name: str):
    ref = load_reference(name)
    torch.manual_seed(0)
    gcn = ConceptGCN(ref["glove"], normalized_adjacency(ref["counts"], ref["adj_all"]))
    y = gcn()
    assert y.shape == (300, 1024) and torch.isfinite(y).all()
    np.testing.assert_allclose(y.norm(dim=1).detach(), 1.0, atol=1e-5)
    assert {n for n, _ in gcn.named_parameters()} == {"layer1.weight", "layer2.weight"}  # X, A_hat fixed


def test_gcn_matches_direct_formula():
    torch.manual_seed(0)
    counts, cooc = random_stats(12, 100, seed=3)
    x = torch.randn(12, 7)
    gcn = ConceptGCN(x, normalized_adjacency(counts, cooc), hidden=9, out_dim=5)
    a = gcn.adjacency.double()
    w1, w2 = gcn.layer1.weight.detach().double(), gcn.layer2.weight.detach().double()
    h = torch.nn.functional.leaky_relu(a @ x.double() @ w1.T, 0.2)
    y = a @ h @ w2.T
    want = y / y.norm(dim=1, keepdim=True)
    np.testing.assert_allclose(gcn().detach().double(), want, rtol=1e-5, atol=1e-6)
    gcn().sum().backward()
    assert gcn.layer1.weight.grad is not None and gcn.word_vectors.grad is None
    with pytest.raises(ValueError, match="adjacency"):
        ConceptGCN(torch.randn(4, 3), torch.eye(5))


def test_query_matches_eq2_loop():
    torch.manual_seed(0)
    query = ConceptQuery(dim=6, smoothness=10.0)
    q, y = torch.randn(4, 6), torch.nn.functional.normalize(torch.randn(9, 6), dim=1)
    v, a = query(q, y, return_weights=True)
    w = query.weight.detach().double()
    for b in range(4):
        scores = [10.0 * float(q[b].double() @ w @ y[i].double()) for i in range(9)]
        top = max(scores)
        exp = [math.exp(s - top) for s in scores]
        weights = [e / sum(exp) for e in exp]
        vec = sum(weights[i] * y[i].double() for i in range(9))
        np.testing.assert_allclose(a[b].detach().double(), weights, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(v[b].detach().double(), vec / vec.norm(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.sum(1).detach(), 1.0, atol=1e-6)
    assert query(q, y).shape == (4, 6)


def test_larger_smoothness_sharpens_weights():
    torch.manual_seed(1)
    q, y = torch.randn(8, 16), torch.nn.functional.normalize(torch.randn(30, 16), dim=1)
    entropies = []
    for lam in (1.0, 10.0, 50.0):
        query = ConceptQuery(dim=16, smoothness=lam)
        with torch.no_grad():
            query.weight.copy_(torch.eye(16))
        a = query(q, y, return_weights=True)[1]
        entropies.append(float(-torch.special.xlogy(a, a).sum(1).mean().detach()))
    assert entropies[0] > entropies[1] > entropies[2]
    with pytest.raises(ValueError, match="ConceptQuery expects"):
        query(torch.randn(2, 5), y)


def test_pgc_loss_matches_loop():
    torch.manual_seed(0)
    lv, lw, z = torch.randn(6, 11), torch.randn(6, 11), torch.randint(0, 11, (6,))
    want = 0.0
    for logits in (lv, lw):
        for b in range(6):
            row = logits[b].double()
            want += (-(row[z[b]] - torch.log(torch.exp(row).sum()))).item() / 6
    np.testing.assert_allclose(pgc(lv, lw, z).item(), want, rtol=1e-6)


def test_pgc_labels_read_by_dataset_index():
    torch.manual_seed(0)
    classifier = PrototypeClassifier(num_prototypes=13, dim=8)
    assert classifier.prototypes.weight.shape == (13, 8) and classifier.prototypes.bias is None
    label_table = torch.randint(0, 13, (50,))  # k-means labels of the whole training set
    v, w = torch.randn(50, 8), torch.randn(50, 8)  # concept embeddings per dataset item
    index = torch.tensor([3, 17, 42, 8, 29])
    loss = pgc(classifier(v[index]), classifier(w[index]), label_table[index])
    shuffled = index[torch.tensor([4, 2, 0, 3, 1])]
    loss_shuffled = pgc(classifier(v[shuffled]), classifier(w[shuffled]), label_table[shuffled])
    assert torch.allclose(loss, loss_shuffled, rtol=1e-6, atol=0)
    wrong = pgc(classifier(v[shuffled]), classifier(w[shuffled]), label_table[index])  # positional
    assert not torch.allclose(loss, wrong)


def test_pgc_rejects_bad_labels():
    with pytest.raises(IndexError):  # out-of-range ids fail in cross-entropy itself (no per-step sync)
        pgc(torch.randn(2, 4), torch.randn(2, 4), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="integer ids"):
        pgc(torch.randn(2, 4), torch.randn(2, 4), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        pgc(torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 1]))


def _bn_tanh_float64(x: torch.Tensor, enc) -> torch.Tensor:
    """tanh(BN(Linear(x))) re-derived in float64 with training-mode (biased) batch statistics."""
    h = x.double() @ enc.fc.weight.detach().double().T + enc.fc.bias.detach().double()
    mean = h.mean(0)
    var = ((h - mean) ** 2).mean(0)
    h = (h - mean) / torch.sqrt(var + enc.bn.eps)
    return torch.tanh(h * enc.bn.weight.detach().double() + enc.bn.bias.detach().double())


@pytest.mark.parametrize("score", ["bilinear", "cvse"])
def test_query_with_cvse_encoders_matches_float64(score: str):
    torch.manual_seed(0)
    query = ConceptQuery(dim=6, smoothness=3.0, encoder="cvse", score=score)
    with torch.no_grad():  # non-trivial affine BN parameters, so a dropped term would show
        for enc in (query.query_encoder, query.basis_encoder):
            enc.bn.weight.uniform_(0.5, 1.5)
            enc.bn.bias.uniform_(-0.3, 0.3)
    q, y = torch.randn(5, 6), torch.nn.functional.normalize(torch.randn(9, 6), dim=1)
    query.train()
    v, a = query(q, y, return_weights=True)
    qe, ye = _bn_tanh_float64(q, query.query_encoder), _bn_tanh_float64(y, query.basis_encoder)
    if score == "bilinear":
        scores = qe @ query.weight.detach().double() @ ye.T
    else:
        w, b = query.scorer.weight.detach().double()[0], query.scorer.bias.detach().double()[0]
        scores = torch.stack([torch.stack([(qe[i] * ye[j] * w).sum() + b for j in range(9)]) for i in range(5)])
    want_a = torch.softmax(3.0 * scores, dim=1)
    want_v = want_a @ y.double()  # v^C combines the SCC rows themselves, not the encoded ones
    want_v = want_v / want_v.norm(dim=1, keepdim=True)
    np.testing.assert_allclose(a.detach().double(), want_a, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(v.detach().double(), want_v, rtol=1e-5, atol=1e-6)
    assert 0.05 < float(want_a.std()) and float(want_a.max()) < 0.99  # neither uniform nor one-hot
    v.sum().backward()  # every new parameter is trained
    for enc in (query.query_encoder, query.basis_encoder):
        assert enc.fc.weight.grad is not None and enc.bn.weight.grad is not None


def test_query_learnable_smoothness():
    torch.manual_seed(0)
    fixed = ConceptQuery(dim=4, smoothness=10.0)
    assert "log_smoothness" not in dict(fixed.named_parameters())
    assert abs(float(fixed.smoothness) - 10.0) < 1e-5
    learned = ConceptQuery(dim=4, smoothness=10.0, learn_smoothness=True)
    assert abs(learned.smoothness.item() - 10.0) < 1e-5
    learned(torch.randn(3, 4), torch.nn.functional.normalize(torch.randn(5, 4), dim=1)).sum().backward()
    assert learned.log_smoothness.grad is not None and torch.isfinite(learned.log_smoothness.grad)
    with pytest.raises(ValueError, match="encoder must be one of"):
        ConceptQuery(dim=4, encoder="bn")
    with pytest.raises(ValueError, match="smoothness"):
        ConceptQuery(dim=4, smoothness=0.0)


def _branch(query_source: str, detach_query: bool, **concept):
    import copy

    from coder.config import DEFAULTS
    from coder.models.model import build_concept_branch

    cfg = copy.deepcopy(DEFAULTS["model"])
    cfg.update(embed_dim=8, region_dim=5, aggregator="mean")
    cfg["concept"].update(query_source=query_source, detach_query=detach_query, gcn_hidden=6, **concept)
    counts, cooc = random_stats(7, 60, seed=4)
    vocab = {"counts": counts, "cooccurrence": cooc, "glove": np.random.default_rng(0).normal(size=(7, 4))}
    return build_concept_branch(cfg, text_hidden=3, vocab=vocab)


@pytest.mark.parametrize("detach_query", [False, True])
def test_branch_instance_queries(detach_query: bool):
    torch.manual_seed(0)
    branch = _branch("instance", detach_query, encoder="cvse", score="cvse")
    assert branch.image_query_head is None and branch.text_query_head is None  # no second aggregators
    v_i = torch.nn.functional.normalize(torch.randn(4, 8), dim=1).requires_grad_()
    w_i = torch.nn.functional.normalize(torch.randn(4, 8), dim=1).requires_grad_()
    regions, states, lengths = torch.randn(4, 3, 5), torch.randn(4, 2, 3), torch.tensor([3, 2, 3, 1])
    v_c = branch.encode_image(regions, lengths, v_i=v_i)
    w_c = branch.encode_text(states, torch.tensor([2, 2, 1, 2]), w_i=w_i)
    basis = branch.gcn()
    torch.testing.assert_close(v_c, branch.image_query(v_i, basis))  # the query is v^I itself
    torch.testing.assert_close(w_c, branch.text_query(w_i, basis))
    (v_c.sum() + w_c.sum()).backward()
    assert (v_i.grad is None) == detach_query and (w_i.grad is None) == detach_query
    with pytest.raises(ValueError, match="needs the instance embedding"):
        branch.encode_image(regions, lengths)


@pytest.mark.parametrize("detach_query", [False, True])
def test_branch_head_queries_detach(detach_query: bool):
    torch.manual_seed(0)
    branch = _branch("heads", detach_query)
    states = torch.randn(4, 2, 3, requires_grad=True)  # BERT token states
    branch.encode_text(states, torch.tensor([2, 2, 1, 2])).sum().backward()
    assert (states.grad is None) == detach_query
    assert branch.text_query_head.fc.weight.grad is not None  # the concept heads still train


def test_branch_shared_query_module():
    torch.manual_seed(0)
    shared = _branch("instance", True, encoder="cvse", score="cvse", share_query=True)
    assert shared.text_query is shared.image_query  # one W (and encoders) for both modalities
    q = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    shared.eval()
    torch.testing.assert_close(shared.encode_image(None, None, v_i=q), shared.encode_text(None, None, w_i=q))
    separate = _branch("instance", True, encoder="cvse", score="cvse")
    assert separate.text_query is not separate.image_query
    n_shared = sum(p.numel() for p in shared.parameters())
    n_separate = sum(p.numel() for p in separate.parameters())
    assert n_separate - n_shared == sum(p.numel() for p in separate.text_query.parameters())
