"""evaluate.py's evidence tools against direct computations: ensembles (averaged fused similarities) and the
paired bootstrap of --compare (per-image resampling of hit indicators), by hand, by a slow loop, by coverage."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from coder.evaluation import (
    COMPARED,
    EvaluationError,
    compare_members,
    evaluate_embeddings,
    evaluate_members,
    format_table,
    member,
    paired_bootstrap,
)
from tests.test_evaluation import _embeddings, assert_same, slow_recalls


def fused(emb, beta):
    return (beta * emb["v_i"] @ emb["w_i"].t() + (1 - beta) * emb["v_c"] @ emb["w_c"].t()).double()


@pytest.mark.parametrize("fold5", [False, True])
def test_an_ensemble_of_a_model_with_itself_is_the_model(fold5):
    emb = _embeddings(50)
    one = evaluate_embeddings(emb, 0.9, fold5=fold5, chunk_size=7)
    two = evaluate_members([member(emb, 0.9)] * 2, fold5=fold5, chunk_size=7)
    assert_same(two, one)
    if fold5:
        assert_same(two["5k"], one["5k"])


def test_an_ensemble_averages_each_models_own_fused_similarity():
    """Two concept models with their own beta and an instance-only model (beta 1): the slow loop on the mean
    of the three full matrices, ranked in chunks of 4 images."""
    a, b, c = _embeddings(30, seed=1), _embeddings(30, seed=2), _embeddings(30, seed=3, concept=False)
    mean = (fused(a, 0.9) + fused(b, 0.5) + (c["v_i"] @ c["w_i"].t()).double()) / 3
    result = evaluate_members([member(a, 0.9), member(b, 0.5), member(c, 0.7)], chunk_size=4)
    assert_same(result, slow_recalls(mean.numpy()))
    assert abs(result["rsum"] - evaluate_embeddings(a, 0.9)["rsum"]) > 1  # not just the first member


def test_an_ensemble_is_labelled_in_the_table():
    result = evaluate_members([member(_embeddings(20), 0.9)] * 2) | {"ensemble": ["a.pth", "a.pth"]}
    table = format_table(result)
    assert table.startswith("ensemble of 2") and "\nensemble of 2 " in table and "\nall " not in table


@pytest.mark.parametrize("fold5", [False, True])
def test_a_model_compared_with_itself_differs_by_zero_with_zero_width(fold5):
    m = member(_embeddings(50), 0.9)
    compare = compare_members([m], [m], fold5=fold5, chunk_size=9)
    assert set(compare) >= ({"main", "5k"} if fold5 else {"main"})
    for row in ("main", "5k") if fold5 else ("main",):
        for name in COMPARED:
            assert compare[row][name] == {"delta": 0.0, "low": 0.0, "high": 0.0}, (row, name)


@pytest.mark.parametrize("fold5", [False, True])
def test_compare_deltas_are_the_differences_of_the_protocol_rows(fold5):
    """The observed Δ against two separate evaluations: with fold5, the 5-fold 1K average (each query ranked
    in its own fold) and 5K; the interval holds the observed Δ."""
    a, b = _embeddings(50, seed=4), _embeddings(50, seed=5)
    ra, rb = evaluate_embeddings(a, 0.9, fold5=fold5), evaluate_embeddings(b, 0.6, fold5=fold5)
    compare = compare_members([member(a, 0.9)], [member(b, 0.6)], fold5=fold5, chunk_size=8, resamples=2000)
    for row, (x, y) in {"main": (ra, rb), **({"5k": (ra["5k"], rb["5k"])} if fold5 else {})}.items():
        assert compare[row]["rsum"]["delta"] == pytest.approx(x["rsum"] - y["rsum"], abs=1e-9)
        for d in ("i2t", "t2i"):
            for k in (1, 5, 10):
                got = compare[row][f"{d}_r{k}"]
                assert got["delta"] == pytest.approx(x[d][f"r{k}"] - y[d][f"r{k}"], abs=1e-9)
                assert got["low"] <= got["delta"] <= got["high"]
        assert compare[row]["rsum"]["high"] - compare[row]["rsum"]["low"] > 1  # random models: a real spread


def test_bootstrap_equals_a_slow_loop_over_resampled_images():
    """Same seed, same draws: each resample takes images with replacement and their 5 captions, and R@K is
    recomputed from the drawn queries' ranks, one resample at a time."""
    rng = np.random.default_rng(0)
    n, resamples = 30, 1000
    ranks_a = (torch.as_tensor(rng.integers(0, 15, n)), torch.as_tensor(rng.integers(0, 15, 5 * n)))
    ranks_b = (torch.as_tensor(rng.integers(0, 12, n)), torch.as_tensor(rng.integers(0, 20, 5 * n)))
    got = paired_bootstrap(ranks_a, ranks_b, resamples=resamples, seed=3)
    drawn = np.random.default_rng(3).integers(0, n, size=(resamples, n))

    def rsum(ranks, images):
        captions = (images[:, None] * 5 + np.arange(5)).ravel()
        i2t, t2i = ranks[0].numpy()[images], ranks[1].numpy()[captions]
        return sum(100 * np.mean(r < k) for r in (i2t, t2i) for k in (1, 5, 10))

    deltas = [rsum(ranks_a, images) - rsum(ranks_b, images) for images in drawn]
    assert got["rsum"]["low"] == pytest.approx(np.percentile(deltas, 2.5), abs=1e-9)
    assert got["rsum"]["high"] == pytest.approx(np.percentile(deltas, 97.5), abs=1e-9)
    everything = np.arange(n)
    assert got["rsum"]["delta"] == pytest.approx(rsum(ranks_a, everything) - rsum(ranks_b, everything), abs=1e-9)


def _ranks(draws, p_hit):
    """Ranks 0 / 3 / 7 / 50 from one uniform draw per query, so P(rank < K) = p_hit[K] exactly."""
    return tuple(torch.as_tensor(np.select([u < p_hit[1], u < p_hit[5], u < p_hit[10]], [0, 3, 7], 50))
                 for u in draws)


def _draws(rng, n):
    """Uniform draws for n images and their 5n captions; one image's captions share half their draws."""
    image_u = rng.random(n)
    caption_u = np.where(rng.random(5 * n) < 0.5, np.repeat(image_u, 5), rng.random(5 * n))  # still uniform
    return image_u, caption_u


def test_bootstrap_intervals_cover_a_known_difference():
    """400 simulated test sets of 150 images: b sees correlated queries (it reuses a's draw 70% of the time)
    and P(hit@K) is fixed, so the true ΔR@K = 100 (p_a - p_b) and ΔR@sum is their sum. About 95% of the
    intervals must hold it."""
    p_a, p_b = {1: 0.40, 5: 0.62, 10: 0.75}, {1: 0.34, 5: 0.60, 10: 0.76}
    truth = 2 * sum(100 * (p_a[k] - p_b[k]) for k in (1, 5, 10))  # i2t and t2i alike
    rng = np.random.default_rng(11)
    covered = {"rsum": 0, "i2t_r1": 0}
    for trial in range(400):
        draws_a, fresh = _draws(rng, 150), _draws(rng, 150)
        draws_b = tuple(np.where(rng.random(d.size) < 0.7, d, f) for d, f in zip(draws_a, fresh))
        got = paired_bootstrap(_ranks(draws_a, p_a), _ranks(draws_b, p_b), resamples=1000, seed=trial)
        covered["rsum"] += got["rsum"]["low"] <= truth <= got["rsum"]["high"]
        covered["i2t_r1"] += got["i2t_r1"]["low"] <= 100 * (p_a[1] - p_b[1]) <= got["i2t_r1"]["high"]
    for name, count in covered.items():
        assert 0.92 <= count / 400 <= 0.975, (name, count / 400)


def test_compare_refuses_another_split_and_too_few_resamples():
    a, b = member(_embeddings(20), 0.9), member(_embeddings(25), 0.9)
    with pytest.raises(EvaluationError, match="same split"):
        compare_members([a], [b])
    with pytest.raises(EvaluationError, match="at least 1000"):
        compare_members([a], [a], resamples=200)


# ------------------------------------------------------------------------------------------ evaluate.py
@pytest.fixture(scope="module")
def checkpoints(tiny_coder_data, tiny_bert_dir, tmp_path_factory):
    """Two tiny untrained CODER checkpoints (concept branch on, seeds 0 and 1) and their own evaluate.py JSON."""
    import evaluate
    from coder.config import load_config
    from coder.engine import Trainer

    paths, single = [], []
    for seed in (0, 1):
        cfg = load_config("configs/demo.yaml", [
            f"data.root={tiny_coder_data}", "data.prepare=", f"model.text_encoder={tiny_bert_dir}",
            "model.text_layers=2", "model.region_dim=16", "model.embed_dim=16", "model.momentum.queue_size=16",
            "cluster.k=7", "train.batch_size=8", "train.device=cpu", "eval.batch_size=20", f"train.seed={seed}"])
        out = tmp_path_factory.mktemp(f"model{seed}")
        Trainer(cfg, out, progress=False).save_best()
        paths.append(str(out / "model_best.pth"))
        assert evaluate.main(["--checkpoint", paths[-1], "--output", str(out / "single"), "--device", "cpu",
                              "--no-progress"]) == 0
        single.append(json.loads((out / "single" / "eval_test.json").read_text()))
    return paths, single


def run_evaluate(tmp_path, capsys, *args):
    import evaluate

    assert evaluate.main([*args, "--output", str(tmp_path), "--device", "cpu", "--no-progress"]) == 0
    return capsys.readouterr().out


def test_evaluate_py_compare(checkpoints, tmp_path, capsys):
    (a, b), (single_a, single_b) = checkpoints
    run_evaluate(tmp_path, capsys, "--checkpoint", a, "--compare", a)
    itself = json.loads((tmp_path / "eval_test.json").read_text())
    assert itself["rsum"] == single_a["rsum"] and itself["compare"]["resamples"] == 1000
    assert all(c == {"delta": 0.0, "low": 0.0, "high": 0.0} for c in itself["compare"]["main"].values())
    printed = run_evaluate(tmp_path, capsys, "--checkpoint", a, "--compare", b, "--resamples", "1500")
    compare = json.loads((tmp_path / "eval_test.json").read_text())["compare"]
    assert compare["main"]["rsum"]["delta"] == pytest.approx(single_a["rsum"] - single_b["rsum"], abs=1e-9)
    assert compare["resamples"] == 1500 and compare["against"]["path"] == str(Path(b).resolve())
    assert "paired bootstrap" in printed and "R@sum" in printed


def test_evaluate_py_ensemble(checkpoints, tmp_path, capsys):
    (a, b), (single_a, _) = checkpoints
    printed = run_evaluate(tmp_path, capsys, "--checkpoint", a, a)
    (path,) = tmp_path.glob("eval_test_ensemble_of_2_*.json")
    doubled = json.loads(path.read_text())
    assert doubled["ensemble"] == [a, a] and "ensemble of 2" in printed and not (tmp_path / "eval_test.json").exists()
    for d in ("i2t", "t2i"):
        assert doubled[d] == pytest.approx(single_a[d], abs=1e-9)
    assert doubled["rsum"] == pytest.approx(single_a["rsum"], abs=1e-9)
    run_evaluate(tmp_path, capsys, "--checkpoint", a, b, "--compare", a)
    (other,) = set(tmp_path.glob("eval_test_ensemble_of_2_*.json")) - {path}
    both = json.loads(other.read_text())
    assert [m["beta"] for m in both["members"]] == [single_a["beta"], checkpoints[1][1]["beta"]]
    assert both["compare"]["main"]["rsum"]["delta"] == pytest.approx(both["rsum"] - single_a["rsum"], abs=1e-9)


def test_evaluate_py_refuses_eccv_on_an_ensemble(checkpoints, tmp_path, capsys):
    import evaluate

    (a, b), _ = checkpoints
    assert evaluate.main(["--checkpoint", a, b, "--eccv", "--output", str(tmp_path), "--device", "cpu",
                          "--no-progress"]) == 2
    assert "--eccv evaluates one model, not an ensemble" in capsys.readouterr().err
