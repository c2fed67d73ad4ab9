"""compute_recalls and the evaluation protocol against a slow, direct re-derivation (CODER §4.1 protocol,
with ties counted against the model)."""
import math

import numpy as np
import pytest
import torch

from coder.evaluation import (
    NonFiniteScoresError,
    chance_rsum,
    check_finite,
    compute_recalls,
    duplicate_captions,
    evaluate_embeddings,
    format_table,
    rank_block,
    recalls_from_ranks,
)


def slow_recalls(sims: np.ndarray, cpi: int = 5) -> dict:
    """Loops over queries in float64. Pessimistic ties: a rank counts every other candidate scored >= the
    positive (i2t: >= the image's best own caption)."""
    sims = np.asarray(sims, dtype=np.float64)
    n_img, n_cap = sims.shape
    i2t_ranks, t2i_ranks = [], []
    for i in range(n_img):
        own = range(cpi * i, cpi * i + cpi)
        best = max(sims[i, j] for j in own)
        i2t_ranks.append(sum(1 for j in range(n_cap) if j not in own and sims[i, j] >= best))
    for j in range(n_cap):
        own_image = j // cpi
        t2i_ranks.append(sum(1 for i in range(n_img) if i != own_image and sims[i, j] >= sims[own_image, j]))

    def metrics(ranks):
        ranks = np.array(ranks, dtype=np.float64)
        out = {f"r{k}": 100.0 * np.mean(ranks < k) for k in (1, 5, 10)}
        out["medr"] = math.floor(np.median(ranks)) + 1
        out["meanr"] = ranks.mean() + 1
        return out

    out = {"i2t": metrics(i2t_ranks), "t2i": metrics(t2i_ranks)}
    out["rsum"] = sum(out[d][f"r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return out


def assert_same(a: dict, b: dict) -> None:
    for d in ("i2t", "t2i"):
        for m in ("r1", "r5", "r10", "medr", "meanr"):
            assert a[d][m] == pytest.approx(b[d][m], abs=1e-9), (d, m)
    assert a["rsum"] == pytest.approx(b["rsum"], abs=1e-9)


@pytest.mark.parametrize("n_img,signal", [(40, 0.0), (40, 1.5), (33, 3.0)])
def test_compute_recalls_matches_slow_loop(n_img, signal):
    rng = np.random.default_rng(n_img)
    sims = rng.normal(size=(n_img, 5 * n_img))
    sims[np.arange(5 * n_img) // 5, np.arange(5 * n_img)] += signal  # make some pairs retrievable
    assert_same(compute_recalls(sims), slow_recalls(sims))
    assert_same(compute_recalls(torch.as_tensor(sims, dtype=torch.float64)), slow_recalls(sims))


@pytest.mark.parametrize("levels", [2, 3, 7])
def test_ties_count_against_the_model(levels):
    """Integer scores in few levels: most comparisons are ties; they must all count as misses."""
    rng = np.random.default_rng(levels)
    sims = rng.integers(0, levels, size=(30, 150)).astype(np.float32)
    assert_same(compute_recalls(sims, chunk_size=7), slow_recalls(sims))


def test_collapsed_model_scores_zero():
    for value in (0.0, 0.7, -1.0):
        result = compute_recalls(np.full((50, 250), value))
        assert result["rsum"] == 0.0
        assert result["i2t"]["meanr"] == 50 * 5 - 5 + 1 and result["t2i"]["meanr"] == 50


def test_non_finite_scores_are_an_error():
    sims = np.random.default_rng(0).random((20, 100))
    for bad in (np.nan, np.inf, -np.inf):
        broken = sims.copy()
        broken[3, 17] = bad
        with pytest.raises(NonFiniteScoresError, match="1 non-finite"):
            compute_recalls(broken)
    with pytest.raises(NonFiniteScoresError, match="2000 non-finite"):
        compute_recalls(np.full((20, 100), np.nan))


def test_embeddings_with_nan_name_their_counts():
    emb = _embeddings(10)
    emb["v_i"][2, 0] = float("nan")
    emb["v_c"][5, 1] = float("inf")
    emb["w_i"][7, 3] = float("nan")
    with pytest.raises(NonFiniteScoresError, match="2 of 10 image embeddings and 1 of 50 caption embeddings"):
        check_finite(emb)
    check_finite(_embeddings(10))  # finite: no error


def test_half_precision_scores_are_ranked_as_float32():
    rng = np.random.default_rng(3)
    sims = torch.as_tensor(rng.normal(size=(20, 100)), dtype=torch.bfloat16)
    assert_same(compute_recalls(sims), slow_recalls(sims.float().numpy()))


def test_chance_rsum_formula_and_random_scores():
    # the closed form against a product written the other way round (all 5 own captions outside the top K)
    for n in (10, 100, 1000):
        other = 0.0
        for k in (1, 5, 10):
            miss = np.prod([(5 * n - k - j) / (5 * n - j) for j in range(5)])
            other += 100 * k / n + 100 * (1 - miss)
        assert chance_rsum(n) == pytest.approx(other, rel=1e-12)
    rng = np.random.default_rng(0)
    mean = np.mean([compute_recalls(rng.random((100, 500)))["rsum"] for _ in range(40)])
    assert abs(mean - chance_rsum(100)) < 3, (mean, chance_rsum(100))
    assert compute_recalls(rng.random((100, 500)))["chance_rsum"] == pytest.approx(chance_rsum(100))


def test_duplicate_captions_counts_only_other_images():
    caps = ["a dog", "a dog", "a cat", "x", "y",  # image 0: "a dog" twice within one image is not counted
            "a cat", "b", "c", "d", "e"]  # image 1 shares "a cat" with image 0
    assert duplicate_captions(caps) == 2


def test_chunked_equals_full():
    rng = np.random.default_rng(1)
    sims = rng.normal(size=(50, 250)) + np.repeat(np.eye(50), 5, axis=1)
    assert_same(compute_recalls(sims, chunk_size=7), compute_recalls(sims, chunk_size=1000))


def test_perfect_and_worst_retrieval():
    n = 20
    sims = np.repeat(np.eye(n), 5, axis=1)
    perfect = compute_recalls(sims + 1e-3 * np.random.default_rng(0).random(sims.shape))
    assert perfect["rsum"] == pytest.approx(600.0)
    assert compute_recalls(sims)["rsum"] == pytest.approx(600.0)  # ties among own captions do not count
    assert perfect["i2t"]["medr"] == 1 and perfect["t2i"]["meanr"] == pytest.approx(1.0)
    worst = compute_recalls(-sims + 1e-3 * np.random.default_rng(0).random(sims.shape))
    assert worst["i2t"]["r10"] == 0.0 and worst["t2i"]["r10"] == 0.0


def test_bad_shape_is_an_error():
    with pytest.raises(ValueError, match="n_images"):
        compute_recalls(np.zeros((10, 40)))


def _embeddings(n_img, dim=16, seed=0, concept=True):
    g = torch.Generator().manual_seed(seed)
    unit = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    v = unit(torch.randn(n_img, dim, generator=g))
    w = unit(v.repeat_interleave(5, 0) + 0.9 * torch.randn(5 * n_img, dim, generator=g))
    emb = {"v_i": v, "w_i": w}
    if concept:
        emb["v_c"] = unit(torch.randn(n_img, dim, generator=g))
        emb["w_c"] = unit(emb["v_c"].repeat_interleave(5, 0) + 1.2 * torch.randn(5 * n_img, dim, generator=g))
    return emb


def test_fused_similarity_and_chunking():
    emb = _embeddings(30)
    beta = 0.9
    fused = beta * emb["v_i"] @ emb["w_i"].t() + (1 - beta) * emb["v_c"] @ emb["w_c"].t()
    expected = slow_recalls(fused.double().numpy())
    assert_same(evaluate_embeddings(emb, beta, chunk_size=4), expected)
    instance_only = slow_recalls((emb["v_i"] @ emb["w_i"].t()).double().numpy())
    assert_same(evaluate_embeddings(emb, 1.0), instance_only)
    no_concept = {k: emb[k] for k in ("v_i", "w_i")}
    assert_same(evaluate_embeddings(no_concept, 0.9), instance_only)  # instance-only model: beta = 1


def test_coco_five_fold_averages_every_metric_and_reports_5k():
    emb = _embeddings(50, concept=False)
    result = evaluate_embeddings(emb, 1.0, fold5=True, chunk_size=3)
    sims = (emb["v_i"] @ emb["w_i"].t()).double().numpy()
    folds = [slow_recalls(sims[f * 10:(f + 1) * 10, f * 50:(f + 1) * 50]) for f in range(5)]
    for d in ("i2t", "t2i"):
        for m in ("r1", "r5", "r10", "medr", "meanr"):
            assert result[d][m] == pytest.approx(np.mean([f[d][m] for f in folds]))
    assert result["rsum"] == pytest.approx(np.mean([f["rsum"] for f in folds]))
    assert_same(result["5k"], slow_recalls(sims))
    assert len(result["folds"]) == 5
    assert "5K" in format_table(result)


def test_rank_block_offsets():
    emb = _embeddings(20, concept=False)
    sims = (emb["v_i"] @ emb["w_i"].t()).double().numpy()
    assert_same(rank_block(emb, 1.0, 10, 10, chunk_size=3), slow_recalls(sims[10:20, 50:100]))


def test_recalls_from_ranks_medr_floor():
    r = recalls_from_ranks(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 0, 9, 20]))
    assert r["i2t"]["medr"] == 2.0  # median 1.5 -> floor 1 -> +1
    assert r["t2i"]["meanr"] == pytest.approx(7.25 + 1)
