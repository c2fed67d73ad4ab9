"""Objective.forward on values: the Eq. 8 sum written out by hand with float64 loops (CODER §3.3-3.4).

Checks the weights (3 / 1 / 1 / 1), the batch/bank diversity average of Eq. 3, the momentum key as the M-DCL
positive (Eq. 6), own-image masking of bank entries, both forms of the DCL positive term, PGC (Eq. 7), and
the triplet baseline's warm-up switch (all negatives, then the hardest).
"""
import math

import pytest
import torch

from coder.config import load_config
from coder.losses import Bank
from coder.step import Objective, build_objective

MU, GAMMA, EPS = 0.1, 0.3, 0.1
B, Q, F, K = 6, 10, 8, 5


def unit(*shape, g):
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def loop_diversity(rows, excluded):
    """Eq. 3 per anchor row over its negatives, max-normalised over the anchors."""
    raw = []
    for n, row in enumerate(rows):
        neg = [s for q, s in enumerate(row) if not excluded(n, q)]
        mean = sum(neg) / len(neg)
        sd = math.sqrt(max(sum((s - mean) ** 2 for s in neg) / len(neg), 1e-12))
        raw.append(1.0 / (1.0 / (1.0 + math.exp(-EPS / sd))))
    top = max(raw)
    return [d / top for d in raw]


def loop_dcl(rows, positives, div, excluded, positive_form):
    """One direction of Eq. 5/6, averaged over anchors; 'unscaled' leaves mu off the positive term."""
    total = 0.0
    for n, row in enumerate(rows):
        neg = sum(math.exp((s - GAMMA) / (MU * div[n])) for q, s in enumerate(row) if not excluded(n, q))
        pos = math.log(1.0 + positives[n])
        total += MU * math.log(1.0 + neg) - (pos if positive_form == "unscaled" else MU * pos)
    return total / len(rows)


def loop_ce(logits, labels):
    return sum(math.log(sum(math.exp(x) for x in row)) - row[z] for row, z in zip(logits, labels)) / len(labels)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {name: unit(B, F, g=g) for name in ("v_i", "w_i", "v_key", "w_key", "v_c", "w_c")}
    bank = Bank(unit(Q, F, g=g), unit(Q, F, g=g), torch.randint(0, 4, (Q,), generator=g),
                torch.randint(0, 4, (Q,), generator=g))
    batch = {"image_index": torch.tensor([0, 0, 1, 2, 3, 3])}
    labels = torch.randint(0, K, (B,), generator=g)
    return out, bank, batch, labels


def objective(*overrides):
    cfg = load_config("configs/f30k_coder.yaml", [f"model.embed_dim={F}", f"cluster.k={K}", *overrides])
    obj = build_objective(cfg).double()
    if obj.prototypes is None:
        return obj
    with torch.no_grad():  # a fixed, non-trivial P^C
        obj.prototypes.prototypes.weight.copy_(torch.randn(K, F, generator=torch.Generator().manual_seed(9),
                                                           dtype=torch.float64))
    return obj


@pytest.mark.parametrize("positive_form", ["paper", "unscaled"])
@pytest.mark.parametrize("mask_own", [False, True])
def test_full_coder_objective_is_eq8_by_hand(positive_form, mask_own):
    out, bank, batch, labels = inputs()
    obj = objective(f"loss.dcl_positive={positive_form}", f"loss.mask_own_image={str(mask_own).lower()}")
    total, terms, _ = obj(out, batch, epoch=1, bank=bank, labels=labels)

    L = lambda t: t.tolist()  # noqa: E731
    S = L(out["v_i"] @ out["w_i"].t())
    St = [list(col) for col in zip(*S)]
    bank_w, bank_v = L(out["v_i"] @ bank.w.t()), L(out["w_i"] @ bank.v.t())
    diagonal = lambda n, q: n == q  # noqa: E731
    own = [int(i) for i in batch["image_index"]]
    mask_w = (lambda n, q: mask_own and int(bank.ids_w[q]) == own[n])  # noqa: E731
    mask_v = (lambda n, q: mask_own and int(bank.ids_v[q]) == own[n])  # noqa: E731
    # Eq. 3 with banks: the average of the batch and the bank estimate (each max-normalised); the bank
    # estimate sees every bank entry (masking changes the DCL negatives, not the diversity)
    div_v = [(a + b) / 2 for a, b in zip(loop_diversity(S, diagonal), loop_diversity(bank_w, lambda n, q: False))]
    div_w = [(a + b) / 2 for a, b in zip(loop_diversity(St, diagonal), loop_diversity(bank_v, lambda n, q: False))]
    diag_pos = [S[n][n] for n in range(B)]
    instance = loop_dcl(S, diag_pos, div_v, diagonal, positive_form) + \
        loop_dcl(St, diag_pos, div_w, diagonal, positive_form)
    key_pos_v = L((out["v_i"] * out["w_key"]).sum(-1))  # Eq. 6: the paired momentum key is the positive
    key_pos_w = L((out["w_i"] * out["v_key"]).sum(-1))
    memory = loop_dcl(bank_w, key_pos_v, div_v, mask_w, positive_form) + \
        loop_dcl(bank_v, key_pos_w, div_w, mask_v, positive_form)
    C = L(out["v_c"] @ out["w_c"].t())
    Ct = [list(col) for col in zip(*C)]
    concept = loop_dcl(C, [C[n][n] for n in range(B)], loop_diversity(C, diagonal), diagonal, positive_form) + \
        loop_dcl(Ct, [C[n][n] for n in range(B)], loop_diversity(Ct, diagonal), diagonal, positive_form)
    P = obj.prototypes.prototypes.weight
    z = labels.tolist()
    pgc = loop_ce(L(out["v_c"] @ P.t()), z) + loop_ce(L(out["w_c"] @ P.t()), z)

    for name, value in (("instance", instance), ("memory", memory), ("concept", concept), ("pgc", pgc)):
        assert float(terms[name].detach()) == pytest.approx(value, rel=1e-10), name
    assert float(total) == pytest.approx(3 * instance + memory + concept + pgc, rel=1e-10)  # Eq. 8


def test_without_labels_pgc_is_absent_and_without_banks_memory_is_absent():
    out, bank, batch, _ = inputs(1)
    total, terms, _ = objective()(out, batch, epoch=0, bank=bank, labels=None)
    assert set(terms) == {"instance", "memory", "concept"}
    total, terms, _ = objective()(out, batch, epoch=0, bank=None, labels=None)
    assert set(terms) == {"instance", "concept"}
    assert float(total) == pytest.approx(3 * float(terms["instance"]) + float(terms["concept"]), rel=1e-12)


@pytest.mark.parametrize("warmup", [1, 3])
def test_triplet_warm_up_then_hardest_negatives(warmup):
    """All negatives for loss.warmup_epochs epochs (3: not the default 1), the hardest from then on."""
    out, _, batch, _ = inputs(2)
    obj = objective("loss.instance=triplet", "loss.instance_weight=1.0", "loss.margin=0.2",
                    f"loss.warmup_epochs={warmup}", "model.concept.enabled=false", "model.momentum.enabled=false")
    S = (out["v_i"] @ out["w_i"].t()).tolist()
    hinge = lambda x: max(0.0, x)  # noqa: E731
    warm = sum(hinge(0.2 + S[n][q] - S[n][n]) + hinge(0.2 + S[q][n] - S[n][n])
               for n in range(B) for q in range(B) if q != n)
    hard = sum(max(hinge(0.2 + S[n][q] - S[n][n]) for q in range(B) if q != n) +
               max(hinge(0.2 + S[q][n] - S[n][n]) for q in range(B) if q != n) for n in range(B))
    for epoch in range(warmup + 2):
        expected = warm if epoch < warmup else hard
        assert float(obj(out, batch, epoch=epoch)[0]) == pytest.approx(expected, rel=1e-10), epoch


def test_pgc_labels_are_looked_up_by_dataset_index_in_a_real_step(tiny_coder_data, tiny_bert_dir, tmp_path,
                                                                   monkeypatch):
    """The engine hands the objective z = labels[caption index] (§3.4: one k-means label per training pair)."""
    from coder.engine import Trainer

    root = tiny_coder_data
    cfg = load_config("configs/demo.yaml", [
        f"data.root={root}", f"model.text_encoder={tiny_bert_dir}", "model.text_layers=2",
        "model.region_dim=16", "model.embed_dim=16", f"model.concept.vocab={root / 'concepts.npz'}",
        "model.momentum.queue_size=16", "cluster.k=7", "train.batch_size=8", "train.max_steps_per_epoch=2",
        "train.epochs=2", "train.device=cpu", "eval.batch_size=20"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    n = len(trainer.train_set)
    known = torch.randperm(n, generator=torch.Generator().manual_seed(0)) % 7  # differs from any image-level label
    trainer.labels = known.clone()
    seen, forward = [], Objective.forward

    def spy(self, out, batch, epoch, bank=None, labels=None):
        seen.append((batch["index"].clone(), batch["image_index"].clone(), labels))
        return forward(self, out, batch, epoch, bank, labels)

    monkeypatch.setattr(Objective, "forward", spy)
    try:
        trainer.train_epoch(1)  # PGC is active from cluster.start_epoch = 1
    finally:
        trainer.log.close()
    assert len(seen) == 2
    for index, image_index, labels in seen:
        assert labels is not None and torch.equal(labels, known[index])
        assert torch.equal(image_index, index // 5)
