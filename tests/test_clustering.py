"""Online spherical k-means (CODER §3.3-3.4) for CODER's prototype labels."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from coder.clustering import spherical_kmeans


def planted(k: int = 8, per: int = 40, dim: int = 32, noise: float = 0.15, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(k, dim, generator=g), dim=1)
    truth = torch.arange(k).repeat_interleave(per)
    x = centers[truth] + noise * torch.randn(k * per, dim, generator=g)
    perm = torch.randperm(k * per, generator=g)
    return x[perm], truth[perm]


def test_recovers_planted_clusters():
    x, truth = planted()
    result = spherical_kmeans(x, 8, iters=20, seed=0)
    # majority mapping: each found cluster votes for a planted one; accuracy of that mapping
    correct = sum(int(torch.bincount(truth[result.labels == c], minlength=8).max())
                  for c in range(8) if (result.labels == c).any())
    assert correct / len(truth) >= 0.99
    assert result.centroids.shape == (8, 32) and result.labels.dtype == torch.long
    torch.testing.assert_close(result.centroids.norm(dim=1), torch.ones(8))
    assert int(result.sizes.sum()) == len(truth)
    torch.testing.assert_close(result.sizes, torch.bincount(result.labels, minlength=8))


def test_inertia_never_rises_and_is_the_objective():
    x = torch.randn(600, 16, generator=torch.Generator().manual_seed(1))  # no structure: many iterations
    result = spherical_kmeans(x, 25, iters=30, seed=3, chunk_size=128)
    assert len(result.inertia) > 3
    for before, after in zip(result.inertia, result.inertia[1:]):
        assert after <= before * (1 + 1e-9)
    # final inertia and labels agree with a direct float64 computation on the returned centroids
    xn = F.normalize(x.double(), dim=1)
    cos = xn @ result.centroids.double().T
    assert torch.equal(cos.argmax(1), result.labels)
    direct = float((1 - cos.gather(1, result.labels[:, None])).sum())
    assert abs(direct - result.inertia[-1]) < 1e-4


def test_chunking_and_seed_determinism():
    x, _ = planted(seed=4)
    a = spherical_kmeans(x, 6, iters=10, seed=5)
    b = spherical_kmeans(x, 6, iters=10, seed=5, chunk_size=7)
    assert torch.equal(a.labels, b.labels)
    torch.testing.assert_close(a.centroids, b.centroids, rtol=1e-5, atol=1e-6)


def test_warm_start_keeps_ids():
    x, _ = planted(seed=2)
    first = spherical_kmeans(x, 8, iters=50, seed=0)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(9))
    again = spherical_kmeans(x, 8, iters=5, init=first.centroids[perm])
    inverse = torch.argsort(perm)  # init[j] = old centroid perm[j]: old id c becomes inverse[c]
    assert torch.equal(again.labels, inverse[first.labels])
    torch.testing.assert_close(again.centroids, first.centroids[perm], rtol=1e-5, atol=1e-6)


def test_more_clusters_than_distinct_points():
    base = F.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    x = base.repeat(4, 1)  # 20 points, 5 distinct
    result = spherical_kmeans(x, 12, iters=5)
    assert torch.isfinite(result.centroids).all() and torch.isfinite(torch.tensor(result.inertia)).all()
    torch.testing.assert_close(result.centroids.norm(dim=1), torch.ones(12))
    assert result.labels.min() >= 0 and result.labels.max() < 12 and int(result.sizes.sum()) == 20
    assert result.inertia[-1] < 1e-4  # every point sits on a centroid
    tiny = spherical_kmeans(x[:3], 7, iters=2)  # k > N
    assert torch.isfinite(tiny.centroids).all() and tiny.labels.shape == (3,)


def test_empty_cluster_reseeded_from_farthest_point():
    x, _ = planted(k=3, per=30, dim=8, seed=6)
    xn = F.normalize(x, dim=1)
    init = torch.cat([xn[:2], -xn[:1]])  # cluster 2 starts opposite to point 0
    best = (xn @ init.T).max(1)
    assert (best.indices != 2).all()  # cluster 2 is empty after the first assignment
    result = spherical_kmeans(x, 3, iters=1, init=init)
    farthest = int(torch.argmin(best.values))
    torch.testing.assert_close(result.centroids[2], xn[farthest])
    assert result.sizes[2] >= 1


def test_bad_input_errors():
    with pytest.raises(ValueError, match=r"\(N, F\)"):
        spherical_kmeans(torch.randn(5), 2)
    with pytest.raises(ValueError, match="init must have shape"):
        spherical_kmeans(torch.randn(5, 3), 2, init=torch.randn(3, 3))
    with pytest.raises(ValueError, match="non-finite"):
        spherical_kmeans(torch.tensor([[1.0, float("nan")]]), 1)


@pytest.mark.skipif(importlib.util.find_spec("faiss") is not None, reason="faiss is installed")
def test_faiss_path_needs_faiss():
    with pytest.raises(ImportError, match="faiss"):
        spherical_kmeans(torch.randn(10, 4), 2, use_faiss=True)


def test_progress_bar_runs(capsys):
    x, _ = planted(seed=7)
    result = spherical_kmeans(x, 8, iters=3, progress=True)
    assert np.isfinite(result.inertia).all()


# ------------------------------------------------------------------------------- when training re-clusters
def tiny_coder_config(root, bert_dir, *overrides):
    from coder.config import load_config

    return load_config("configs/demo.yaml", [
        f"data.root={root}", f"model.text_encoder={bert_dir}", "model.text_layers=2", "model.region_dim=16",
        "model.embed_dim=16", f"model.concept.vocab={root / 'concepts.npz'}", "model.momentum.queue_size=16",
        "cluster.k=7", "cluster.iters=2", "train.batch_size=8", "train.max_steps_per_epoch=2", "train.device=cpu",
        "eval.batch_size=20", *overrides])


class Stop(Exception):
    """Ends a run right after a chosen checkpoint, as a kill would."""


def test_kmeans_runs_once_per_epoch_from_start_epoch_and_not_again_after_a_mid_epoch_resume(
        tiny_coder_data, tiny_bert_dir, tmp_path, monkeypatch):
    """§3.4: the pairs are re-clustered at the start of every epoch from cluster.start_epoch (here 1 of 0-2),
    on the un-augmented training split; a run stopped after a mid-epoch checkpoint of epoch 1 and resumed
    keeps that epoch's saved labels (no second k-means in epoch 1) and clusters again for epoch 2."""
    from coder.engine import Trainer

    cfg = tiny_coder_config(tiny_coder_data, tiny_bert_dir, "train.epochs=3", "cluster.start_epoch=1",
                            "train.save_every=1")
    import coder.clustering
    import coder.engine

    calls, augmented, runs, update, save_last = [], [], [], Trainer.update_clusters, Trainer.save_last
    cluster, kmeans = coder.engine.cluster_training_pairs, coder.clustering.spherical_kmeans

    def spy(self, epoch):
        calls.append(epoch)
        return update(self, epoch)

    def cluster_spy(encode_pairs, dataset, **kwargs):
        augmented.append(dataset.train)
        return cluster(encode_pairs, dataset, **kwargs)

    def kmeans_spy(x, k, **kwargs):
        result = kmeans(x, k, **kwargs)
        runs.append((k, kwargs["iters"], kwargs["init"], result.centroids.clone()))
        return result

    def save_then_stop_in_epoch_1(self):
        save_last(self)
        if (self.epoch, self.step_in_epoch) == (1, 1):
            raise Stop

    monkeypatch.setattr(Trainer, "update_clusters", spy)
    monkeypatch.setattr(coder.engine, "cluster_training_pairs", cluster_spy)
    monkeypatch.setattr(coder.clustering, "spherical_kmeans", kmeans_spy)
    monkeypatch.setattr(Trainer, "save_last", save_then_stop_in_epoch_1)
    with pytest.raises(Stop):
        Trainer(cfg, tmp_path, progress=False).fit()
    assert calls == [1]
    monkeypatch.setattr(Trainer, "save_last", save_last)
    resumed = Trainer(cfg, tmp_path, resume="auto", progress=False)
    assert (resumed.epoch, resumed.step_in_epoch) == (1, 1) and resumed.labels is not None
    calls.clear()
    resumed.fit()
    assert calls == [2] and augmented == [False, False]
    # cluster.k prototypes and cluster.iters iterations; epoch 2 starts from epoch 1's centroids (online
    # k-means), carried through the checkpoint
    (k1, iters1, init1, centroids1), (k2, iters2, init2, _) = runs
    assert (k1, iters1, k2, iters2) == (7, 2, 7, 2) and init1 is None
    torch.testing.assert_close(init2, centroids1)


def test_kmeans_input_is_the_normalised_sum_of_the_momentum_pair_embeddings(tiny_coder_data, tiny_bert_dir,
                                                                            tmp_path):
    """§3.4 clusters "the summation of instance-level representations v^I and w^I": x = L2norm(v^I + w^I) of
    each pair, from the momentum encoders (at the start equal to the online ones; an online update that the
    key encoders have not followed yet leaves x as it was)."""
    from coder.data import collate
    from coder.engine import Trainer, training_split

    cfg = tiny_coder_config(tiny_coder_data, tiny_bert_dir, "train.epochs=1")
    trainer = Trainer(cfg, tmp_path, progress=False)
    trainer.log.close()
    trainer.step.eval()  # the model and the momentum encoders (dropout off)
    model = trainer.model
    data = training_split(cfg, trainer.tokenizer, train=False)
    batch = collate([data[i] for i in range(0, len(data), 7)])
    inputs = (batch["regions"], batch["region_lengths"], batch["input_ids"], batch["text_lengths"])
    with torch.no_grad():
        x = trainer.step.momentum.encode_pairs(*inputs)
        v = model.encode_image(batch["regions"], batch["region_lengths"])["v_i"]
        w = model.encode_text(batch["input_ids"], batch["text_lengths"])["w_i"]
        torch.testing.assert_close(x, F.normalize(v + w, dim=-1))
        assert not torch.allclose(x, F.normalize(v, dim=-1)) and not torch.allclose(x, F.normalize(w, dim=-1))
        for p in [*model.image_encoder.parameters(), *model.text_encoder.parameters()]:
            p.add_(torch.randn_like(p))
        torch.testing.assert_close(trainer.step.momentum.encode_pairs(*inputs), x)
