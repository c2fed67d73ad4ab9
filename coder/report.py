"""Retrieval report: what a trained model retrieves for sampled queries, and which concepts they attend to.

The pieces are usable on their own:
- `rank_queries(emb, beta, direction, queries)` ranks the chosen queries' candidates from embeddings with
  the fused score S = beta cos(v^I, w^I) + (1 - beta) cos(v^C, w^C) of CODER §3.5, ties broken the way the
  evaluation counts them (a rank counts every other candidate scored >= the positive);
- `image_attention` / `caption_attention` / `text_attention` return the Eq. 2 weights a^v, a^w (§3.2)
  over the concept basis Y for chosen items, and `top_concepts` names the largest;
- `render_html(report)` writes one self-contained page (inline CSS, images as data URIs, no network).
`build_report(checkpoint, ...)` ties them together for scripts/show_retrievals.py.
"""
from __future__ import annotations

import base64
import html
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .checkpoint import atomic_save
from .concepts import load_concepts
from .config import concept_vocab_path
from .data import collate, tokenize_caption
from .errors import ReportError
from .evaluation import encode_split, fuse, pessimistic_rank, split_datasets
from .evaluation.loading import load_for_eval

DIRECTIONS = ("i2t", "t2i")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".JPG", ".JPEG", ".PNG")


# ------------------------------------------------------------------------------------------- ranking
@dataclass
class Candidate:
    """One retrieved item: its index in the split (caption for i2t, image for t2i) and its scores."""
    index: int
    score: float  # the fused S of §3.5 (the instance score alone for instance-only models)
    instance: float  # cos(v^I, w^I)
    concept: float | None  # cos(v^C, w^C); None without the concept branch
    positive: bool  # a ground-truth match of the query
    position: int  # 0-based position in the ranked list


@dataclass
class QueryResult:
    direction: str  # "i2t": an image retrieves captions; "t2i": a caption retrieves images
    query: int  # image index (i2t) or caption index (t2i); -1 for a typed caption
    results: list[Candidate]  # the top k
    rank: int | None  # 0-based rank of the ground truth (R@K counts rank < K); None for a typed caption
    truth: Candidate | None  # the best-ranked ground truth when it is outside the top k
    text: str | None = None  # the typed caption


def score_rows(emb: dict[str, Tensor], beta: float, direction: str, queries: Sequence[int],
               query_emb: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """(fused, instance, concept) scores (Q, N) of the chosen queries against every candidate.

    The evaluation's formula (`coder.evaluation.fuse`, §3.5): S = beta S^I + (1 - beta) S^C; an instance-only
    model (no v_c / w_c) or beta = 1 ranks by S^I alone. `query_emb` replaces the split's query
    embeddings (a typed caption: keys w_i [, w_c]).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    q_key, c_key = ("v", "w") if direction == "i2t" else ("w", "v")
    source = query_emb if query_emb is not None else {k: v[list(queries)] for k, v in emb.items()
                                                      if k.startswith(q_key)}
    instance = source[f"{q_key}_i"] @ emb[f"{c_key}_i"].t()
    concept = None
    if f"{q_key}_c" in source and f"{c_key}_c" in emb:
        concept = source[f"{q_key}_c"] @ emb[f"{c_key}_c"].t()
    return fuse(instance, concept, beta), instance, concept


def positive_mask(direction: str, query: int, n_candidates: int, captions_per_image: int = 5) -> np.ndarray:
    """Ground truth of a query: an image's own captions (i2t), or a caption's image (t2i)."""
    mask = np.zeros(n_candidates, dtype=bool)
    if direction == "i2t":
        mask[query * captions_per_image:(query + 1) * captions_per_image] = True
    else:
        mask[query // captions_per_image] = True
    return mask


def ranked_order(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Candidates by score, high first; among equal scores negatives come before positives (pessimistic,
    so the first positive's position is `pessimistic_rank`), then by index."""
    return np.lexsort((np.arange(len(scores)), positive, -scores))


def rank_queries(emb: dict[str, Tensor], beta: float, direction: str, queries: Sequence[int], k: int = 5,
                 captions_per_image: int = 5) -> list[QueryResult]:
    """The top k of each query, the ground truth's rank, and the ground truth itself when outside the top k."""
    fused, instance, concept = score_rows(emb, beta, direction, queries)
    out = []
    for row, query in enumerate(queries):
        scores = fused[row].double().numpy()
        positive = positive_mask(direction, query, len(scores), captions_per_image)
        order = ranked_order(scores, positive)
        cands = [_candidate(int(j), pos, fused[row], instance[row], None if concept is None else concept[row],
                            positive) for pos, j in enumerate(order[:k])]
        rank = pessimistic_rank(scores, positive)
        truth = None
        if rank >= k:
            j = int(order[rank])
            truth = _candidate(j, rank, fused[row], instance[row], None if concept is None else concept[row],
                               positive)
        out.append(QueryResult(direction, int(query), cands, rank, truth))
    return out


def rank_typed(emb: dict[str, Tensor], beta: float, text: str, text_emb: dict[str, Tensor],
               k: int = 5) -> QueryResult:
    """The split's images ranked for a typed caption (no ground truth)."""
    fused, instance, concept = score_rows(emb, beta, "t2i", [0], query_emb=text_emb)
    scores = fused[0].double().numpy()
    none = np.zeros(len(scores), dtype=bool)
    order = ranked_order(scores, none)
    cands = [_candidate(int(j), pos, fused[0], instance[0], None if concept is None else concept[0], none)
             for pos, j in enumerate(order[:k])]
    return QueryResult("t2i", -1, cands, None, None, text=text)


def _candidate(j: int, position: int, fused: Tensor, instance: Tensor, concept: Tensor | None,
               positive: np.ndarray) -> Candidate:
    return Candidate(j, float(fused[j]), float(instance[j]), None if concept is None else float(concept[j]),
                     bool(positive[j]), position)


def sample_queries(n_images: int, n_captions: int, count: int, seed: int) -> dict[str, list[int]]:
    """`count` distinct image queries and caption queries, reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    return {"i2t": sorted(rng.choice(n_images, min(count, n_images), replace=False).tolist()),
            "t2i": sorted(rng.choice(n_captions, min(count, n_captions), replace=False).tolist())}


# ------------------------------------------------------------------------------------------- concepts
@torch.no_grad()
def image_attention(model, images_ds, indices: Sequence[int], device="cpu") -> Tensor:
    """Eq. 2 weights a^v (len(indices), g) of the chosen images over the concepts."""
    model.eval()
    if not len(indices):
        return torch.zeros(0, 0)
    batch = collate([images_ds[int(i)] for i in indices])
    regions, lengths = batch["regions"].to(device), batch["region_lengths"].to(device)
    v_i = model.image_encoder(regions, lengths, batch["clip"].to(device) if "clip" in batch else None)
    return model.concept.encode_image(regions, lengths, v_i=v_i, return_weights=True)[1].float().cpu()


@torch.no_grad()
def text_attention(model, input_ids: Tensor, lengths: Tensor, device="cpu") -> Tensor:
    """Eq. 2 weights a^w (B, g) of token-id batches over the concepts."""
    model.eval()
    input_ids, lengths = input_ids.to(device), lengths.to(device)
    w_i, states = model.text_encoder(input_ids, lengths)
    return model.concept.encode_text(states, lengths, w_i=w_i, return_weights=True)[1].float().cpu()


def caption_attention(model, captions_ds, indices: Sequence[int], device="cpu") -> Tensor:
    """Eq. 2 weights a^w (len(indices), g) of the chosen captions of a split."""
    if not len(indices):
        return torch.zeros(0, 0)
    batch = collate([captions_ds[int(i)] for i in indices])
    return text_attention(model, batch["input_ids"], batch["text_lengths"], device)


def top_concepts(weights: Tensor, words: Sequence[str], n: int = 5) -> list[tuple[str, float]]:
    """The n concepts with the largest attention weight, with their weight (they sum to 1 over all g)."""
    values, idx = torch.topk(weights, min(n, weights.numel()))
    return [(str(words[int(i)]), float(v)) for v, i in zip(values, idx)]


# ------------------------------------------------------------------------------------------- images
def image_files(images_dir: str | Path, ids: Sequence[str]) -> dict[str, Path]:
    """The file of each id in `images_dir` (`<id>.jpg`, `.png`, ...); a missing folder or file is an error."""
    folder = Path(images_dir)
    if not folder.is_dir():
        raise ReportError(f"images folder not found: {folder}")
    out = {}
    for image_id in ids:
        found = next((folder / f"{image_id}{s}" for s in IMAGE_SUFFIXES if (folder / f"{image_id}{s}").is_file()),
                     None)
        if found is None:
            raise ReportError(f"no image file for id {image_id!r}: expected {folder / image_id}.jpg "
                              f"(or {', '.join(IMAGE_SUFFIXES[1:4])}) in {folder}")
        out[image_id] = found
    return out


def thumbnail_uri(path: str | Path, size: int = 160) -> str:
    """A JPEG thumbnail of an image file as a data: URI (embedded in the page, no external asset)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=80)
    except (OSError, UnidentifiedImageError) as err:
        raise ReportError(f"cannot read image {path}: {err}") from err
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ------------------------------------------------------------------------------------------- page
@dataclass
class Report:
    """Everything the page shows; `render_html` turns it into HTML."""
    title: str
    meta: dict  # checkpoint, split, dataset, beta, counts ...
    blocks: list[QueryResult]
    captions: Sequence[str]
    image_label: list[str]  # per image: its id (or row index)
    image_html: dict[int, str] = field(default_factory=dict)  # image index -> visual (thumbnail / scene)
    image_text: dict[int, str] = field(default_factory=dict)  # image index -> description
    image_concepts: dict[int, list[tuple[str, float]]] = field(default_factory=dict)
    caption_concepts: dict[int, list[tuple[str, float]]] = field(default_factory=dict)
    typed_concepts: dict[int, list[tuple[str, float]]] = field(default_factory=dict)  # block number -> concepts
    concept_branch: bool = False


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:2px solid #ddd}
.meta{color:#555;font-size:13px;margin-bottom:8px} .meta code{background:#eee;padding:1px 4px;border-radius:3px}
.query{background:#fff;border:1px solid #ddd;border-radius:8px;padding:12px 14px;margin:12px 0}
.query.found{border-left:6px solid #2e9d4a} .query.missed{border-left:6px solid #d64545}
.query.typed{border-left:6px solid #3a6fd8}
.qhead{display:flex;gap:14px;align-items:flex-start;margin-bottom:8px}
.qlabel{font-weight:600;font-size:12px;color:#666;text-transform:uppercase}
.qtext{font-size:16px;font-weight:600} .rankinfo{font-size:13px;color:#444;margin-top:3px}
ol.results{list-style:none;padding:0;margin:0;display:flex;flex-direction:column;gap:6px}
.result,.truth{display:flex;gap:12px;align-items:flex-start;padding:6px 8px;border-radius:6px;background:#f6f6f6}
.result.hit{background:#e5f5e9} .result.miss{background:#fbeeee} .truth{background:#fff6dc;margin-top:6px}
.mark{font-weight:700;width:58px;flex:none;font-size:13px} .hit .mark{color:#1f7a37} .miss .mark{color:#b23030}
.truth .mark{color:#8a6500}
.scores{font-family:ui-monospace,Menlo,monospace;font-size:12px;color:#333;flex:none;width:190px}
.body{flex:1;min-width:0} .ctext{font-size:14px} .iid{font-family:ui-monospace,monospace;font-size:12px;color:#555}
.desc{font-size:12px;color:#444} img.thumb{max-width:160px;max-height:160px;border-radius:4px}
.concepts{margin-top:3px;display:flex;flex-wrap:wrap;gap:4px}
.concept{font-size:11px;background:#e8eefc;color:#1d3f8f;border-radius:10px;padding:1px 7px}
.legend{font-size:13px;color:#444;background:#fff;border:1px solid #ddd;border-radius:8px;padding:8px 12px}
"""


def _concept_chips(concepts: list[tuple[str, float]] | None) -> str:
    if not concepts:
        return ""
    chips = "".join(f'<span class="concept" title="Eq. 2 weight {w:.4f}">{html.escape(c)} {100 * w:.0f}%</span>'
                    for c, w in concepts)
    return f'<div class="concepts">{chips}</div>'


def _image_cell(rep: Report, k: int) -> str:
    parts = [rep.image_html.get(k, ""), f'<div class="iid">image {html.escape(rep.image_label[k])}</div>']
    if k in rep.image_text:
        parts.append(f'<div class="desc">{html.escape(rep.image_text[k])}</div>')
    parts.append(_concept_chips(rep.image_concepts.get(k)))
    return "".join(parts)


def _caption_cell(rep: Report, j: int, cpi: int) -> str:
    return (f'<div class="ctext">{html.escape(rep.captions[j])}</div>'
            f'<div class="iid">caption {j} (of image {html.escape(rep.image_label[j // cpi])})</div>'
            + _concept_chips(rep.caption_concepts.get(j)))


def _scores(c: Candidate) -> str:
    if c.concept is None:
        return f'<div class="scores">S {c.score:.3f}</div>'
    return (f'<div class="scores">S {c.score:.3f}<br>instance {c.instance:.3f}<br>'
            f'concept {c.concept:.3f}</div>')


def _result_item(rep: Report, block: QueryResult, c: Candidate, cpi: int) -> str:
    cell = _caption_cell(rep, c.index, cpi) if block.direction == "i2t" else _image_cell(rep, c.index)
    if block.rank is None:  # typed caption: nothing to score against
        cls, mark = "result", f"#{c.position + 1}"
    else:
        cls, mark = (("result hit", f"#{c.position + 1} ✓") if c.positive
                     else ("result miss", f"#{c.position + 1} ✗"))
    return (f'<li class="{cls}" data-index="{c.index}" data-positive="{int(c.positive)}" '
            f'data-position="{c.position}"><div class="mark">{mark}</div>{_scores(c)}'
            f'<div class="body">{cell}</div></li>')


def _block(rep: Report, n: int, block: QueryResult, k: int, cpi: int) -> str:
    if block.text is not None:
        head = (f'<div><div class="qlabel">typed caption → images</div><div class="qtext">'
                f'{html.escape(block.text)}</div>{_concept_chips(rep.typed_concepts.get(n))}</div>')
        cls, attrs = "query typed", 'data-direction="t2i" data-query="typed"'
    else:
        found = block.rank < k
        cls = "query " + ("found" if found else "missed")
        attrs = f'data-direction="{block.direction}" data-query="{block.query}" data-rank="{block.rank}"'
        where = (f"ground truth at #{block.rank + 1}: in the top {k}" if found
                 else f"ground truth at #{block.rank + 1}: not in the top {k}")
        if block.direction == "i2t":
            head = (f'<div><div class="qlabel">image → captions</div>{_image_cell(rep, block.query)}'
                    f'<div class="rankinfo">{where}</div></div>')
        else:
            head = (f'<div><div class="qlabel">caption → images</div><div class="qtext">'
                    f'{html.escape(rep.captions[block.query])}</div>'
                    f'<div class="iid">caption {block.query} (of image '
                    f'{html.escape(rep.image_label[block.query // cpi])})</div>'
                    f'{_concept_chips(rep.caption_concepts.get(block.query))}'
                    f'<div class="rankinfo">{where}</div></div>')
    items = "".join(_result_item(rep, block, c, cpi) for c in block.results)
    truth = ""
    if block.truth is not None:
        t = block.truth
        cell = _caption_cell(rep, t.index, cpi) if block.direction == "i2t" else _image_cell(rep, t.index)
        truth = (f'<div class="truth" data-index="{t.index}" data-position="{t.position}">'
                 f'<div class="mark">#{t.position + 1} GT</div>{_scores(t)}<div class="body">{cell}</div></div>')
    return (f'<section class="{cls}" {attrs}><div class="qhead">{head}</div>'
            f'<ol class="results">{items}</ol>{truth}</section>')


def render_html(rep: Report, k: int = 5) -> str:
    """One self-contained HTML page: inline CSS, images as data URIs, nothing fetched."""
    cpi = rep.meta.get("captions_per_image", 5)
    meta = " · ".join(f"{html.escape(str(key))} <code>{html.escape(str(value))}</code>"
                      for key, value in rep.meta.items())
    beta = rep.meta.get("beta")
    legend = (f"Each block is one query and its top {k}. ✓ marks a ground-truth match, ✗ a non-match; "
              f"#n is the position (ties counted against the ground truth, as the evaluation does). "
              f"When the ground truth is not in the top {k}, it is shown below with its rank (GT).")
    if rep.concept_branch:
        legend += (f" Scores: S = β·instance + (1−β)·concept with β = {beta} (CODER §3.5); the chips are the "
                   f"concepts with the largest attention weight a of Eq. 2 (§3.2), in percent of the "
                   f"softmax over all concepts.")
    else:
        legend += " Scores: S = cos(v, w) of the instance embeddings (no concept branch in this checkpoint)."
    sections = []
    for name, label in (("typed", "Typed caption"), ("i2t", "Image → text"), ("t2i", "Text → image")):
        chosen = [(n, b) for n, b in enumerate(rep.blocks)
                  if (b.text is not None) == (name == "typed") and (name == "typed" or b.direction == name)]
        if not chosen:
            continue
        summary = ""
        if name != "typed":
            hits = sum(b.rank < k for _, b in chosen)
            summary = (f' <span class="meta">({hits} of {len(chosen)} queries have their ground truth in the '
                       f'top {k})</span>')
        sections.append(f'<h2 id="{name}">{label}{summary}</h2>'
                        + "".join(_block(rep, n, b, k, cpi) for n, b in chosen))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(rep.title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{html.escape(rep.title)}</h1><div class=\"meta\">{meta}</div>"
            f"<div class=\"legend\">{legend}</div>{''.join(sections)}</body></html>\n")


# ------------------------------------------------------------------------------------------- end to end
def load_model(checkpoint: str | Path, overrides: Sequence[str] = (), device="cpu"):
    """(model, cfg, tokenizer) from a checkpoint, loaded as evaluate.py loads it (`load_for_eval`: no momentum
    key encoders, every other weight exactly the checkpoint's); `overrides` are `a.b=v` strings for data.*,
    eval.*, model.concept.vocab (where the concepts file lies now) and model.text_encoder. `eval.beta` is the
    fusion weight the report ranks by: training's choice on dev unless overridden."""
    loaded = load_for_eval(checkpoint, overrides, device, who="show_retrievals")
    loaded.cfg["eval"]["beta"] = loaded.fusion_beta
    return loaded.model, loaded.cfg, loaded.tokenizer


def _file_key(path: Path) -> list:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def cached_embeddings(cache: Path | None, checkpoint: str | Path, cfg: dict, split: str, files, encode) -> dict:
    """`encode()`'s embeddings, reused from `cache` when it was written for the same checkpoint file, split
    files and data settings (encoding the split is most of a report's time); None disables the cache."""
    paths = [Path(checkpoint), files.ims_path, files.caps_path]
    key = json.dumps({"files": [_file_key(p) for p in paths], "data": cfg["data"], "split": split},
                     sort_keys=True, default=str)
    if cache is not None and cache.is_file():
        try:
            saved = torch.load(cache, map_location="cpu", weights_only=True)
            if saved.get("key") == key:
                return saved["emb"]
        except Exception:  # unreadable or foreign: encode again and overwrite
            pass
    emb = encode()
    if cache is not None:
        try:
            atomic_save({"key": key, "emb": emb}, cache)
        except OSError:
            pass  # a read-only checkpoint folder: no cache, same page
    return emb


def shown_items(blocks: Sequence[QueryResult]) -> tuple[list[int], list[int]]:
    """(image indices, caption indices) that appear on the page: queries, results and ground truths."""
    images, captions = set(), set()
    for b in blocks:
        items = b.results + ([b.truth] if b.truth is not None else [])
        if b.text is None:
            (images if b.direction == "i2t" else captions).add(b.query)
        (captions if b.direction == "i2t" else images).update(c.index for c in items)
    return sorted(images), sorted(captions)


def add_concepts(rep: Report, model, cfg: dict, images_ds, captions_ds, shown_images, shown_captions, typed,
                 n_concepts: int, device) -> None:
    """The top Eq. 2 concepts of every image and caption on the page (and of the typed caption)."""
    vocab = load_concepts(concept_vocab_path(cfg))
    words = vocab.words
    # the checkpoint keeps the GloVe rows X it was trained with (§3.2): the words must be those rows'
    glove, trained = torch.as_tensor(vocab.glove), model.concept.gcn.word_vectors.cpu()
    if glove.shape != trained.shape or not torch.allclose(glove, trained):
        raise ReportError(f"{concept_vocab_path(cfg)} is not the concepts file this checkpoint was "
                          f"trained with (its word vectors differ); point --set model.concept.vocab at it")
    for idx, weights in zip(shown_images, image_attention(model, images_ds, shown_images, device)):
        rep.image_concepts[idx] = top_concepts(weights, words, n_concepts)
    for idx, weights in zip(shown_captions, caption_attention(model, captions_ds, shown_captions, device)):
        rep.caption_concepts[idx] = top_concepts(weights, words, n_concepts)
    if typed is not None:
        rep.typed_concepts[0] = top_concepts(text_attention(model, *typed, device)[0], words,
                                             n_concepts)


def build_report(checkpoint: str | Path, *, split: str | None = None, queries: int = 20, seed: int = 0,
                 images_dir: str | Path | None = None, query_text: str | None = None, k: int = 5,
                 n_concepts: int = 5, overrides: Sequence[str] = (), device="cpu", progress: bool = False,
                 cache: str | Path | None = None, describe_images=None) -> Report:
    """Load a checkpoint, encode a split once (or reuse `cache`, see `cached_embeddings`; a folder there
    means `<checkpoint stem>.report_<split>.pt` in it), rank sampled queries in both directions (and a typed
    caption), and gather what the page shows. `describe_images(root, split, n_images, captions)` may give, for
    data it knows (`coder.demo.visual.scene_describer`), image index -> (text, inline HTML)."""
    t0 = time.perf_counter()
    if images_dir is not None and not Path(images_dir).is_dir():
        raise ReportError(f"images folder not found: {images_dir}")  # before the (slow) encoding
    model, cfg, tokenizer = load_model(checkpoint, overrides, device)
    data, cpi = cfg["data"], cfg["data"]["captions_per_image"]
    split = split or data["test_split"]
    images_ds, captions_ds = split_datasets(cfg, tokenizer, split)
    if cache is not None and Path(cache).is_dir():
        cache = Path(cache) / f"{Path(checkpoint).stem}.report_{split}.pt"
    emb = cached_embeddings(None if cache is None else Path(cache), checkpoint, cfg, split, images_ds.files,
                            lambda: encode_split(model, images_ds, captions_ds, device, cfg["eval"]["batch_size"],
                                                 cfg["data"]["num_workers"], progress, cfg["eval"]["amp"]))
    concept_branch = "v_c" in emb and model.concept is not None
    beta = float(cfg["eval"]["beta"]) if concept_branch else 1.0

    chosen = sample_queries(len(images_ds), len(captions_ds), queries, seed)
    blocks: list[QueryResult] = []
    if query_text is not None:  # tokenised as the split's captions are
        typed_ids = torch.tensor([tokenize_caption(tokenizer, query_text, data["max_words"])])
        typed_lengths = torch.tensor([typed_ids.size(1)])
        with torch.no_grad():
            typed_emb = model.encode_text(typed_ids.to(device), typed_lengths.to(device))
        blocks.append(rank_typed(emb, beta, query_text, {key: v.float().cpu() for key, v in typed_emb.items()}, k))
    for direction in DIRECTIONS:
        blocks.extend(rank_queries(emb, beta, direction, chosen[direction], k, cpi))

    shown_images, shown_captions = shown_items(blocks)
    ids = images_ds.image_ids
    labels = list(ids) if ids is not None else [str(i) for i in range(len(images_ds))]
    rep = Report(title=f"Retrievals of {Path(checkpoint).name} on {split}", meta={}, blocks=blocks,
                 captions=captions_ds.files.captions, image_label=labels, concept_branch=concept_branch)

    if concept_branch:
        typed = (typed_ids, typed_lengths) if query_text is not None else None
        add_concepts(rep, model, cfg, images_ds, captions_ds, shown_images, shown_captions, typed, n_concepts,
                     device)
    if images_dir is not None:
        files = image_files(images_dir, [labels[i] for i in shown_images])
        for i in shown_images:
            rep.image_html[i] = (f'<img class="thumb" src="{thumbnail_uri(files[labels[i]])}" '
                                 f'alt="image {html.escape(labels[i])}">')
    describe = describe_images and describe_images(data["root"], split, len(images_ds), captions_ds.files.captions)
    for i in shown_images if describe else ():
        rep.image_text[i], picture = describe(i)
        rep.image_html.setdefault(i, picture)  # a real thumbnail wins

    rep.meta = {"checkpoint": str(checkpoint), "split": split, "dataset": data["dataset"],
                "images": len(images_ds), "captions": len(captions_ds), "captions_per_image": cpi,
                "beta": beta if concept_branch else "— (instance only)", "seed": seed,
                "built in": f"{time.perf_counter() - t0:.1f} s"}
    return rep
