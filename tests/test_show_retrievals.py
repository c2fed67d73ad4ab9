"""scripts/show_retrievals.py and coder/report.py: the page's blocks, hit marks and ranks against a direct
computation from the similarity matrix, Eq. 2 concepts for CODER checkpoints only, images, errors."""
import html as htmllib
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from coder.report import (
    ReportError,
    build_report,
    load_model,
    pessimistic_rank,
    rank_queries,
    ranked_order,
    render_html,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import show_retrievals  # noqa: E402

SPLIT = "train"  # the shared tiny data set's largest split: 16 images, 80 captions
N_QUERIES = 4


def make_checkpoint(path: Path, root: Path, bert_dir: str, concept: bool) -> Path:
    """A randomly initialised model saved as train.py saves model_best.pth (no training needed)."""
    from coder.checkpoint import FORMAT_VERSION
    from coder.config import load_config
    from coder.models.model import build_model
    from coder.models.text import load_text_backbone

    cfg = load_config(None, [f"data.root={root}", f"model.text_encoder={bert_dir}",
                             "model.text_layers=2", "model.region_dim=16", "model.embed_dim=32",
                             f"model.concept.enabled={str(concept).lower()}",
                             f"model.concept.vocab={root / 'concepts.npz'}",
                             "model.concept.gcn_hidden=16", "model.momentum.enabled=false", "loss.pgc_weight=0.0",
                             "eval.beta=0.7", "train.device=cpu"])
    torch.manual_seed(1)
    bert, _ = load_text_backbone(bert_dir, 2)
    model = build_model(cfg, bert)
    torch.save({"format": "coder", "version": FORMAT_VERSION, "config": cfg, "model": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_coder_data, tiny_bert_dir):
    tmp = tmp_path_factory.mktemp("report")
    return {"coder": make_checkpoint(tmp / "coder.pth", tiny_coder_data, tiny_bert_dir, True),
            "instance": make_checkpoint(tmp / "instance.pth", tiny_coder_data, tiny_bert_dir, False)}


def run_script(tmp_path, checkpoint, *extra) -> tuple[int, str]:
    out = tmp_path / f"{Path(checkpoint).stem}.html"
    rc = show_retrievals.main(["--checkpoint", str(checkpoint), "--split", SPLIT, "--queries", str(N_QUERIES),
                               "--seed", "3", "--out", str(out), *extra])
    return rc, out.read_text(encoding="utf-8") if rc == 0 else ""


@pytest.fixture(scope="module")
def coder_page(tmp_path_factory, checkpoints):
    rc, page = run_script(tmp_path_factory.mktemp("coder_page"), checkpoints["coder"],
                          "--query", "a man riding a red bicycle")
    assert rc == 0
    return page


def blocks(page: str) -> list[dict]:
    """Each query block of the page: its attributes, result items, ground-truth item and concept chips."""
    out = []
    for attrs, body in re.findall(r'<section class="query[^"]*" ([^>]*)>(.*?)</section>', page, re.S):
        a = dict(re.findall(r'([\w-]+)="([^"]*)"', attrs))
        results = [dict(re.findall(r'([\w-]+)="([^"]*)"', m)) for m in re.findall(r'<li ([^>]*)>', body)]
        truth = re.search(r'<div class="truth" ([^>]*)>', body)
        truth = dict(re.findall(r'([\w-]+)="([^"]*)"', truth.group(1))) if truth else None
        head = body.split('<ol class="results">')[0]
        out.append({"direction": a["data-direction"], "query": a["data-query"], "rank": a.get("data-rank"),
                    "results": results, "truth": truth,
                    "head_concepts": re.findall(r'<span class="concept"[^>]*>([^<]*)</span>', head),
                    "n_concept_lists": body.count('<div class="concepts">'), "body": body})
    return out


_DIRECT = {}


@torch.no_grad()
def direct_similarities(checkpoint) -> tuple[np.ndarray, float, dict, object]:
    """S = beta S^I + (1 - beta) S^C (§3.5) for every image-caption pair, from the split's embeddings."""
    from coder.evaluation import encode_split
    from coder.evaluation import split_datasets as eval_datasets

    if checkpoint in _DIRECT:  # encoded once per checkpoint
        return _DIRECT[checkpoint]
    model, cfg, tokenizer = load_model(checkpoint)
    emb = encode_split(model, *eval_datasets(cfg, tokenizer, SPLIT), "cpu", progress=False)
    beta = cfg["eval"]["beta"] if "v_c" in emb else 1.0
    sims = (emb["v_i"] @ emb["w_i"].t()).double().numpy()
    if "v_c" in emb:
        sims = beta * sims + (1 - beta) * (emb["v_c"] @ emb["w_c"].t()).double().numpy()
    _DIRECT[checkpoint] = sims, beta, emb, (model, cfg, tokenizer)
    return _DIRECT[checkpoint]


def direct_rank(sims: np.ndarray, direction: str, query: int, cpi: int = 5) -> tuple[int, np.ndarray]:
    """Evaluation's tie rule, written out: count every other candidate scored >= the positive; for i2t,
    the best such rank among the image's own captions."""
    if direction == "i2t":
        row, own = sims[query], set(range(query * cpi, query * cpi + cpi))
        rank = min(sum(row[c] >= row[p] for c in range(len(row)) if c not in own) for p in own)
        return rank, np.array([c in own for c in range(len(row))])
    col, own = sims[:, query], query // cpi
    return sum(col[i] >= col[own] for i in range(len(col)) if i != own), np.arange(len(col)) == own


# ---------------------------------------------------------------------------------------------- ranks
def test_rank_and_order_follow_the_pessimistic_tie_rule():
    rng = np.random.default_rng(0)
    sims = rng.integers(0, 3, size=(8, 40)).astype(np.float64)  # many ties
    for direction, n_queries in (("i2t", 8), ("t2i", 40)):
        for q in range(n_queries):
            scores = sims[q] if direction == "i2t" else sims[:, q]
            rank, positive = direct_rank(sims, direction, q)
            assert pessimistic_rank(scores, positive) == rank
            order = ranked_order(scores, positive)
            assert int(np.flatnonzero(positive[order])[0]) == rank  # the first ground truth sits at its rank
            assert np.all(np.diff(scores[order]) <= 0)


def test_rank_queries_match_compute_recalls_on_every_query():
    from coder.evaluation import compute_recalls

    emb = {k: torch.nn.functional.normalize(torch.randn(n, 8, generator=torch.Generator().manual_seed(s)), dim=-1)
           for k, n, s in (("v_i", 10, 0), ("w_i", 50, 1), ("v_c", 10, 2), ("w_c", 50, 3))}
    emb["w_i"][:10] = emb["v_i"][torch.arange(10) // 5 + torch.arange(10) % 2]  # some near matches
    sims = (0.6 * emb["v_i"] @ emb["w_i"].t() + 0.4 * emb["v_c"] @ emb["w_c"].t()).numpy()
    recalls = compute_recalls(sims)
    for direction, n in (("i2t", 10), ("t2i", 50)):
        results = rank_queries(emb, 0.6, direction, list(range(n)), k=5)
        for k in (1, 5, 10):
            assert 100.0 * np.mean([r.rank < k for r in results]) == pytest.approx(recalls[direction][f"r{k}"])
        for r in results:
            assert any(c.positive for c in r.results) == (r.rank < 5)
            assert (r.truth is None) == (r.rank < 5)


# ---------------------------------------------------------------------------------------------- page
def test_page_has_one_block_per_query_and_marks_agree_with_direct_ranks(coder_page, checkpoints):
    found = blocks(coder_page)
    sampled = [b["direction"] for b in found if b["query"] != "typed"]
    assert sampled.count("i2t") == N_QUERIES and sampled.count("t2i") == N_QUERIES
    assert [b["query"] for b in found].count("typed") == 1
    sims, beta, _, _ = direct_similarities(checkpoints["coder"])
    for b in found:
        if b["query"] == "typed":
            continue
        q = int(b["query"])
        rank, positive = direct_rank(sims, b["direction"], q)
        assert int(b["rank"]) == rank, b
        scores = sims[q] if b["direction"] == "i2t" else sims[:, q]
        top = [int(i) for i in np.argsort(-scores, kind="stable")[:5]]  # random weights: no ties
        assert [int(r["data-index"]) for r in b["results"]] == top
        for r in b["results"]:
            assert r["data-positive"] == str(int(positive[int(r["data-index"])]))
            assert ("hit" in r["class"]) == positive[int(r["data-index"])]
        assert any("hit" in r["class"] for r in b["results"]) == (rank < 5)
        if rank < 5:
            assert b["truth"] is None
        else:
            assert int(b["truth"]["data-position"]) == rank and positive[int(b["truth"]["data-index"])]
        # the shown S is the fused score of the instance and concept scores (§3.5)
        for s, inst, conc in re.findall(r"S (-?[\d.]+)<br>instance (-?[\d.]+)<br>concept (-?[\d.]+)", b["body"]):
            assert float(s) == pytest.approx(beta * float(inst) + (1 - beta) * float(conc), abs=2e-3)


def test_concepts_come_from_eq2_for_coder_and_are_absent_for_instance_only(coder_page, checkpoints, tmp_path):
    from coder.concepts import load_concepts
    from coder.evaluation import split_datasets as eval_datasets

    found = blocks(coder_page)
    _, _, _, (model, cfg, tokenizer) = direct_similarities(checkpoints["coder"])
    words = load_concepts(cfg["model"]["concept"]["vocab"]).words
    images, captions = eval_datasets(cfg, tokenizer, SPLIT)
    for b in found:
        assert b["head_concepts"], b["query"]  # the query's own concepts
        assert b["n_concept_lists"] == 1 + len(b["results"]) + (b["truth"] is not None)
        if b["direction"] != "i2t" or b["query"] == "typed":
            continue
        item = images[int(b["query"])]  # Eq. 2 weights of the query image, computed here directly
        with torch.no_grad():
            q = model.concept.image_query_head(item["regions"][None], torch.tensor([len(item["regions"])]))
            _, weights = model.concept.image_query(q, model.concept.gcn(), return_weights=True)
        top = torch.topk(weights[0], 5)
        shown = [htmllib.unescape(c).rsplit(" ", 1) for c in b["head_concepts"]]
        assert [w for w, _ in shown] == [str(words[int(i)]) for i in top.indices]
        assert [int(p.rstrip("%")) for _, p in shown] == [round(100 * float(v)) for v in top.values]

    rc, page = run_script(tmp_path, checkpoints["instance"])
    assert rc == 0
    assert len(blocks(page)) == 2 * N_QUERIES
    assert 'class="concept' not in page and "<br>concept" not in page


def test_typed_caption_ranks_images_by_its_own_embedding(coder_page, checkpoints):
    from coder.data import tokenize_caption

    typed = next(b for b in blocks(coder_page) if b["query"] == "typed")
    _, beta, emb, (model, cfg, tokenizer) = direct_similarities(checkpoints["coder"])
    ids = torch.tensor([tokenize_caption(tokenizer, "a man riding a red bicycle", cfg["data"]["max_words"])])
    with torch.no_grad():
        w = model.encode_text(ids, torch.tensor([ids.size(1)]))
    scores = (beta * emb["v_i"] @ w["w_i"][0] + (1 - beta) * emb["v_c"] @ w["w_c"][0]).numpy()
    assert [int(r["data-index"]) for r in typed["results"]] == [int(i) for i in np.argsort(-scores)[:5]]
    assert typed["rank"] is None and len(typed["head_concepts"]) == 5
    assert "a man riding a red bicycle" in typed["body"]


def test_page_is_self_contained_and_describes_demo_scenes(coder_page, tiny_coder_data):
    from coder.demo.scenes import sample_scenes
    from coder.demo.visual import describe_scene

    assert "http" not in coder_page and "<script" not in coder_page and "<link" not in coder_page
    assert "<style>" in coder_page
    scenes = sample_scenes(0, SPLIT, 16)  # the generator's own scenes of the shared tiny data
    for b in blocks(coder_page):
        if b["direction"] == "i2t" and b["query"] != "typed":
            head = b["body"].split('<ol class="results">')[0]
            desc = f'<div class="desc">{htmllib.escape(describe_scene(scenes[int(b["query"])]))}</div>'
            assert desc in head and "<svg" in head


# ---------------------------------------------------------------------------------------------- images
def test_images_are_embedded_and_missing_ones_are_clear_errors(checkpoints, tiny_coder_data, tmp_path, capsys):
    from PIL import Image

    ids = (tiny_coder_data / f"{SPLIT}_ids.txt").read_text().split()
    folder = tmp_path / "images"
    folder.mkdir()
    for n, image_id in enumerate(ids):
        Image.new("RGB", (64, 48), (n * 15 % 256, 80, 160)).save(folder / f"{image_id}.{'png' if n % 2 else 'jpg'}")
    rc, page = run_script(tmp_path, checkpoints["instance"], "--images", str(folder))
    assert rc == 0
    srcs = re.findall(r'<img class="thumb" src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/jpeg;base64,") for s in srcs)
    assert len(srcs) == sum(b["body"].count("<img") for b in blocks(page))

    missing = tmp_path / "no_such_folder"
    rc, _ = run_script(tmp_path, checkpoints["instance"], "--images", str(missing))
    assert rc == 2 and f"images folder not found: {missing}" in capsys.readouterr().err

    report = build_report(checkpoints["instance"], split=SPLIT, queries=N_QUERIES, seed=3)
    shown = next(b.query for b in report.blocks if b.direction == "i2t")
    gone = next(folder.glob(f"{ids[shown]}.*"))
    gone.unlink()
    with pytest.raises(ReportError) as err:
        build_report(checkpoints["instance"], split=SPLIT, queries=N_QUERIES, seed=3, images_dir=folder)
    assert "no image file for id" in str(err.value) and f"{folder / ids[shown]}.jpg" in str(err.value)
    assert render_html(report).count('<section class="query') == 2 * N_QUERIES


def test_embedding_cache_is_reused_until_the_checkpoint_changes(checkpoints, tmp_path, monkeypatch):
    import os

    import coder.report

    cache = tmp_path / "emb.pt"
    first = build_report(checkpoints["instance"], split=SPLIT, queries=N_QUERIES, seed=3, cache=cache)
    assert cache.is_file()
    calls = []
    real = coder.report.encode_split
    monkeypatch.setattr(coder.report, "encode_split", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    again = build_report(checkpoints["instance"], split=SPLIT, queries=N_QUERIES, seed=3, cache=cache)
    assert calls == [] and [b.rank for b in again.blocks] == [b.rank for b in first.blocks]
    stat = checkpoints["instance"].stat()
    os.utime(checkpoints["instance"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new checkpoint file
    build_report(checkpoints["instance"], split=SPLIT, queries=N_QUERIES, seed=3, cache=cache)
    assert calls == [1]


def test_a_concepts_file_other_than_the_checkpoints_is_refused(checkpoints, tiny_coder_data, tmp_path):
    from coder.concepts import load_concepts

    vocab = load_concepts(tiny_coder_data / "concepts.npz")
    vocab.glove = vocab.glove[::-1].copy()  # same size, rows in another order: the words would be wrong
    other, _ = vocab.save(tmp_path)
    with pytest.raises(ReportError, match="not the concepts file this checkpoint was trained with"):
        build_report(checkpoints["coder"], split=SPLIT, queries=1, cache=None,
                     overrides=[f"model.concept.vocab={other}"])
