"""Every shipped config (configs/**.yaml) builds its Trainer and trains one step on tiny generated data.

Each config keeps its own method, losses and switches; only the sizes and paths are overridden (tiny demo
data with 16-d regions, a tiny random BERT, a concept vocabulary built from the tiny captions with a random
GloVe file). The step must log finite loss terms -- exactly the terms the config switches on -- and move
every trainable parameter the step uses. Configs with PGC also train a step with k-means labels active.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from coder.config import load_config
from coder.demo import generate_demo_data
from coder.engine import Trainer
from coder.tools.vocabulary import build_concepts, read_captions, tokenize

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))

# Loss terms each paper config must log once PGC is on (epoch 1; epoch 0 logs the same without "pgc",
# PGC starts at cluster.start_epoch = 1): a config that silently drops or adds a term of its paper row fails
# here. Configs not listed are checked against the terms their own switches imply (expected_terms).
CODER_FULL = {"instance", "memory", "concept", "pgc"}  # Eq. 8
NO_MDCL = {"instance", "concept", "pgc"}
EXPECTED = {
    "f30k_coder": CODER_FULL, "coco_coder": CODER_FULL, "demo": CODER_FULL,
    "f30k_vse": {"instance"}, "coco_vse": {"instance"}, "f30k_vse_bigru": {"instance"}, "coco_vse_bigru": {"instance"},
    "f30k_coder_bigru": CODER_FULL, "coco_coder_bigru": CODER_FULL, "demo_bigru": CODER_FULL,
    "world": CODER_FULL, "world_triplet": {"instance"},  # configs/study/
    "table2_row1_btr": {"instance"}, "table2_row2_dcl": {"instance"}, "table2_row3_mdcl": {"instance", "memory"},
    "table2_row4_concept_dcl": {"instance", "memory", "concept"}, "table2_row5_pgc": CODER_FULL,
    "table3_row1_ie": NO_MDCL, "table3_row2_ie_ee": NO_MDCL, "table3_row3_ie_ee_mb": NO_MDCL,
    "table3_row4_ie_mdcl": CODER_FULL, "table3_row5_ie_ee_mdcl": CODER_FULL, "table3_row6_ie_ee_mb_mdcl": CODER_FULL,
    **{f"table4_k{k}": CODER_FULL for k in (5000, 10000, 15000, 20000)},
    **{f"fig3_bs{b}_wo_mdcl": NO_MDCL for b in (32, 64, 128)},
    **{f"fig3_bs{b}_w_mdcl": CODER_FULL for b in (32, 64, 128)},
    **{name: {"instance", "memory"} for name in ("f30k_user", "coco_user", "demo_user", "world_user")},  # UTO, queue
}


# Which instance loss each row runs (Table 2 #1 and the VSE baselines: triplet; Table 3's "IE" rows: the
# implicit DCL of Eq. 4; USER: UTO; everything else Eq. 5), checked on the functions the step really calls.
INSTANCE_LOSS = {"f30k_vse": "triplet", "coco_vse": "triplet", "f30k_vse_bigru": "triplet", "coco_vse_bigru": "triplet",
                 "table2_row1_btr": "triplet", "world_triplet": "triplet",
                 "table3_row1_ie": "dcl_implicit", "table3_row4_ie_mdcl": "dcl_implicit",
                 "f30k_user": "uto", "coco_user": "uto", "demo_user": "uto", "world_user": "uto"}


def spy_losses(monkeypatch) -> list[str]:
    """Record the loss functions the objective calls, in order ('dcl' with a diversity, 'dcl_implicit'
    without one)."""
    import importlib

    import coder.losses.registry as terms

    dcl_module = importlib.import_module("coder.losses.dcl")  # the module (coder.losses.dcl is the function)

    calls: list[str] = []

    def wrap(name, fn):
        def spy(*args, **kwargs):
            calls.append("dcl_implicit" if name == "dcl" and kwargs.get("div") is None else name)
            return fn(*args, **kwargs)
        return spy

    for name in ("dcl", "triplet", "infonce", "uto_term"):
        monkeypatch.setattr(terms, name, wrap(name.removesuffix("_term"), getattr(terms, name)))
    monkeypatch.setattr(dcl_module, "dcl", wrap("dcl", dcl_module.dcl))  # what dcl_bidirectional calls
    return calls


def check_instance_loss(calls: list[str], expected: str, where: str) -> None:
    first = expected
    assert calls, f"{where}: no loss function was called"
    assert calls[0] == first, f"{where}: instance loss is {calls[0]}, expected {first} (calls: {calls})"
    if expected in ("dcl", "dcl_implicit"):  # both directions of the instance term
        assert calls[1] == expected, f"{where}: second direction is {calls[1]}, expected {expected}"
    if expected in ("triplet", "uto"):
        assert not any(c.startswith("dcl") for c in calls), f"{where}: DCL called in a {expected} row: {calls}"


def expected_terms(cfg: dict) -> set[str]:
    """The terms a config's switches imply (fallback for configs not in EXPECTED)."""
    loss, model = cfg["loss"], cfg["model"]
    terms = {"instance"}
    if model["momentum"]["enabled"] and loss["memory_weight"] > 0:
        terms.add("memory")
    if model["concept"]["enabled"] and loss["concept_weight"] > 0:
        terms.add("concept")
    if model["concept"]["enabled"] and loss["pgc_weight"] > 0:
        terms.add("pgc")
    return terms


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: thread start-up costs more than it saves, and much more on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> tuple[Path, Path]:
    """Demo data (8/4/4 images, 36 x 16-d regions, 512-d CLIP) and its concept vocabulary, built once."""
    root = generate_demo_data(tmp_path_factory.mktemp("tiny_data"), seed=0, train_images=8, dev_images=4,
                              test_images=4, region_dim=16)
    words = sorted({w for c in read_captions(root / "train_caps.txt") for w in tokenize(c)})
    rng = np.random.default_rng(0)
    glove = root / "glove.tiny.8d.txt"
    glove.write_text("".join(f"{w} {' '.join(f'{x:.4f}' for x in rng.standard_normal(8))}\n" for w in words))
    build_concepts(root, glove, num_concepts=24, pos_method="heuristic")
    return root, root / "concepts.npz"


def tiny_overrides(root: Path, vocab: Path, bert: str) -> list[str]:
    return [f"data.root={root}", "data.num_workers=0", f"model.text_encoder={bert}",
            "model.region_dim=16", "model.embed_dim=32", f"model.concept.vocab={vocab}",
            "model.momentum.queue_size=16", "cluster.k=4", "cluster.iters=3", "train.batch_size=8",
            "train.max_steps_per_epoch=1", "train.epochs=1", "train.device=cpu", "eval.batch_size=20",
            "model.bigru.word_dim=8", "model.bigru.hidden=32"]  # BiGRU configs: as wide as the tiny GloVe, F


def record_logged_terms(trainer: Trainer) -> list[dict[str, float]]:
    """Wrap the trainer's TensorBoard logger so each step's loss terms are kept for the test."""
    logged, log_step = [], trainer._log_step

    def spy(loss, terms, diag, grad_norm, lr, rate):
        logged.append({"total": loss.item(), **{k: v.item() for k, v in terms.items()}})
        log_step(loss, terms, diag, grad_norm, lr, rate)

    trainer._log_step = spy
    return logged


def trainable(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.step_module.named_parameters() if p.requires_grad}


def unchanged(trainer: Trainer, before: dict[str, torch.Tensor]) -> set[str]:
    params = dict(trainer.step_module.named_parameters())
    return {n for n, old in before.items() if torch.equal(params[n].detach(), old)}


def check_step(logged: list[dict[str, float]], expected: set[str], where: str) -> None:
    assert len(logged) == 1, f"{where}: expected one logged step, got {len(logged)}"
    step = logged[0]
    main = {k for k in step if k != "total" and not k.endswith(("_i2t", "_t2i")) and k != "uto_total"}
    assert main == expected, f"{where}: logged terms {sorted(step)}, expected {sorted(expected)}"
    bad = {k: v for k, v in step.items() if not np.isfinite(v)}
    assert not bad, f"{where}: non-finite loss terms {bad}"


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in CONFIGS])
def test_config_trains_one_step(path, tiny_data, tiny_bert_dir, tmp_path, monkeypatch):
    root, vocab = tiny_data
    cfg = load_config(path, tiny_overrides(root, vocab, tiny_bert_dir))
    if cfg["model"]["bigru"]["glove"]:  # a BiGRU config that names word vectors gets the tiny GloVe file
        cfg["model"]["bigru"]["glove"] = str(root / "glove.tiny.8d.txt")
    expected = EXPECTED.get(path.stem, expected_terms(cfg))
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    calls = spy_losses(monkeypatch)
    try:
        has_pgc = trainer.objective.prototypes is not None
        assert has_pgc == ("pgc" in expected), f"{path}: PGC classifier P^C present = {has_pgc}"
        logged = record_logged_terms(trainer)
        before = trainable(trainer)
        trainer.train_epoch(0)
        check_step(logged, expected - {"pgc"}, f"{path} epoch 0")
        check_instance_loss(calls, INSTANCE_LOSS.get(path.stem, "dcl"), str(path))
        # P^C gets no gradient before k-means labels exist; everything else the step uses must move
        idle = {n for n in unchanged(trainer, before) if ".prototypes." not in f".{n}"}
        assert not idle, f"{path}: parameters not updated by the step: {sorted(idle)[:8]}"
        if trainer.step.momentum is not None:
            assert trainer.step.momentum.queue_v.fill_fraction() > 0, f"{path}: keys were not enqueued"

        if has_pgc:  # epoch 1: k-means on the momentum features, then a step with L_PGC (Eq. 7)
            assert not trainer.objective.needs_labels(0) and trainer.objective.needs_labels(1)
            trainer.update_clusters(1)
            assert trainer.labels is not None and trainer.labels.shape == (len(trainer.train_set),)
            assert int(trainer.labels.max()) < cfg["cluster"]["k"]
            logged.clear()
            before = trainable(trainer)
            trainer.step_in_epoch = 0  # as fit() does between epochs
            trainer.train_epoch(1)
            check_step(logged, expected, f"{path} epoch 1 (PGC active)")
            assert not any(".prototypes." in f".{n}" for n in unchanged(trainer, before)), \
                f"{path}: the PGC classifier P^C was not updated"
    finally:
        trainer.log.close()
