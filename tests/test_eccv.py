"""ECCV Caption / CxC metrics on COCO's 5K test: id alignment, chunked top-k lists, and metric values derived
by hand from the package's own annotation maps (perfect ranking by the ECCV positives, and one miss first)."""
import json

import numpy as np
import pytest
import torch

from coder.evaluation.eccv import _package_dir, coco_test_ids, eccv_metrics, metrics_from_top_k, needed_k, top_k


@pytest.fixture(scope="module")
def ids():
    return coco_test_ids()


@pytest.fixture(scope="module")
def maps():
    data = _package_dir()
    load = lambda name: {int(k): v for k, v in json.loads((data / name).read_text()).items()}  # noqa: E731
    return {"i2t": load("eccv_image_to_caption.json"), "t2i": load("eccv_caption_to_image.json"),
            "coco_t2i": load("original_caption_to_image.json")}


def test_coco_ids_follow_the_karpathy_test_order(ids):
    image_ids, caption_ids = ids
    assert image_ids.shape == (5000,) and caption_ids.shape == (25000,)
    assert len(set(image_ids.tolist())) == 5000 and len(set(caption_ids.tolist())) == 25000


def test_top_k_matches_a_full_sort():
    g = torch.Generator().manual_seed(0)
    unit = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    emb = {"v_i": unit(torch.randn(30, 8, generator=g)), "w_i": unit(torch.randn(150, 8, generator=g)),
           "v_c": unit(torch.randn(30, 8, generator=g)), "w_c": unit(torch.randn(150, 8, generator=g))}
    i2t, t2i = top_k(emb, 0.9, k_i2t=12, k_t2i=7, chunk_size=4)
    sims = 0.9 * emb["v_i"] @ emb["w_i"].t() + 0.1 * emb["v_c"] @ emb["w_c"].t()
    assert torch.equal(i2t, sims.argsort(dim=1, descending=True)[:, :12])
    assert torch.equal(t2i, sims.t().argsort(dim=1, descending=True)[:, :7])


def _lists(positives_of, n_queries, n_items, length, first_miss):
    """Ranked index lists: the query's positives first (optionally after one non-positive), then fillers."""
    lists = []
    for q in range(n_queries):
        pos = positives_of(q)
        fillers = [x for x in range(length + len(pos) + 1) if x not in pos][: length]
        ranked = ([fillers[0]] if first_miss else []) + pos + fillers[1 if first_miss else 0:]
        lists.append(ranked[:length])
    return torch.tensor(lists, dtype=torch.long)


def _rankings(ids, maps, first_miss):
    image_ids, caption_ids = ids
    image_row = {int(i): r for r, i in enumerate(image_ids)}
    caption_row = {int(c): r for r, c in enumerate(caption_ids)}
    k_i2t, k_t2i = needed_k()

    def caption_positives(r):  # ECCV positives where annotated (those in the 25,000), else the own captions
        iid = int(image_ids[r])
        if iid not in maps["i2t"]:
            return list(range(5 * r, 5 * r + 5))
        return [caption_row[c] for c in maps["i2t"][iid] if c in caption_row]

    def image_positives(r):
        cid = int(caption_ids[r])
        return [image_row[i] for i in maps["t2i"][cid]] if cid in maps["t2i"] else [r // 5]

    return (_lists(caption_positives, 5000, 25000, k_i2t + 1, first_miss),
            _lists(image_positives, 25000, 5000, k_t2i + 1, first_miss))


def _sizes(ids, gts, targets):
    """(R, m) per query: R positives in the annotation, m of them among the split's items."""
    present = set(int(x) for x in targets)
    return [(len(set(v)), len(set(v) & present)) for v in gts.values()]


def test_perfect_ranking_by_eccv_positives(ids, maps):
    """Reachable positives first: R@1 = 100; R-P = AP@R = m / R (2 ECCV caption positives are not among
    coco_precomp's 25,000 captions, so a few images have m < R)."""
    i2t, t2i = _rankings(ids, maps, first_miss=False)
    scores = metrics_from_top_k(i2t, t2i, *ids)
    for direction, gts, targets in (("i2t", maps["i2t"], ids[1]), ("t2i", maps["t2i"], ids[0])):
        expected = 100 * np.mean([m / r for r, m in _sizes(ids, gts, targets)])
        assert scores["eccv_r1"][direction] == pytest.approx(100.0)
        assert scores["eccv_rprecision"][direction] == pytest.approx(expected)
        assert scores["eccv_map_at_r"][direction] == pytest.approx(expected)
    assert scores["eccv_map_at_r"]["t2i"] == pytest.approx(100.0)  # every caption query is fully reachable


def test_one_miss_first_gives_the_hand_derived_scores(ids, maps):
    """A non-positive at rank 1, then the m reachable positives: R@1 = 0, R-P = min(m, R-1) / R,
    AP@R = (1/R) sum over relevant ranks j = 2..min(m+1, R) of precision@j = (j-1)/j."""
    i2t, t2i = _rankings(ids, maps, first_miss=True)
    scores = metrics_from_top_k(i2t, t2i, *ids)
    for direction, gts, targets in (("i2t", maps["i2t"], ids[1]), ("t2i", maps["t2i"], ids[0])):
        sizes = _sizes(ids, gts, targets)
        rp = np.mean([min(m, r - 1) / r for r, m in sizes])
        ap = np.mean([sum((j - 1) / j for j in range(2, min(m + 1, r) + 1)) / r for r, m in sizes])
        assert scores["eccv_r1"][direction] == pytest.approx(0.0)
        assert scores["eccv_rprecision"][direction] == pytest.approx(100 * rp)
        assert scores["eccv_map_at_r"][direction] == pytest.approx(100 * ap)


def test_eccv_refuses_a_split_that_is_not_coco_5k():
    emb = {"v_i": torch.zeros(1000, 4), "w_i": torch.zeros(5000, 4)}
    with pytest.raises(ValueError, match="COCO's 5K test split"):
        eccv_metrics(emb)


def test_evaluate_py_eccv_on_a_coco_shaped_testall(tiny_bert_dir, tmp_path, capsys):
    """End to end and offline: a tiny model evaluated on a 5,000-image / 25,000-caption testall split."""
    import evaluate
    from coder.config import load_config
    from coder.demo import generate_demo_data
    from coder.engine import Trainer

    root = generate_demo_data(tmp_path / "coco", seed=0, train_images=16, dev_images=4, test_images=5000,
                              region_dim=8)
    for kind in ("ims.npy", "caps.txt"):
        (root / f"testall_{kind}").symlink_to(root / f"test_{kind}")
    cfg = load_config("configs/baselines/coco_vse.yaml", [
        f"data.root={root}", f"model.text_encoder={tiny_bert_dir}", "model.region_dim=8",
        "model.embed_dim=16", "train.batch_size=8", "train.epochs=1", "train.max_steps_per_epoch=1",
        "train.device=cpu", "data.test_split=dev", "eval.batch_size=1000"])
    Trainer(cfg, tmp_path / "run", progress=False).fit()
    assert evaluate.main(["--checkpoint", str(tmp_path / "run" / "model_best.pth"), "--split", "testall", "--eccv",
                          "--device", "cpu", "--no-progress"]) == 0
    saved = json.loads((tmp_path / "run" / "eval_testall.json").read_text())
    assert "5k" in saved and len(saved["folds"]) == 5
    for name in ("eccv_map_at_r", "eccv_rprecision", "eccv_r1", "cxc_r1", "coco_5k_r1"):
        assert set(saved["eccv"][name]) == {"i2t", "t2i"} and all(0 <= v <= 100 for v in saved["eccv"][name].values())
    # COCO 5K R@1 from the package's lists agrees with our own 5K R@1 within the rate of score ties
    assert abs(saved["eccv"]["coco_5k_r1"]["t2i"] - saved["5k"]["t2i"]["r1"]) < 1.0
    assert "ECCV mAP@R" in capsys.readouterr().out
