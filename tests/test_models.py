"""Aggregators, heads and the text backbone (VSE-infinity's heads, CODER §3.2)."""
import pytest
import torch

from coder.lengths import valid_mask
from coder.models.aggregators import GPO, MaxPool, MeanPool, positional_encoding
from coder.models.heads import ImageHead, TextHead
from coder.models.text import ModelFileError, TextBackbone, load_text_backbone, resolve_model_dir


def _features(b=4, n=7, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, d, generator=g), torch.tensor([7, 3, 1, 5])[:b]


def test_gpo_weights_sum_to_one_over_valid_positions():
    gpo = GPO()
    lengths = torch.tensor([7, 3, 1, 5])
    w = gpo.pool_weights(lengths, 7).squeeze(-1)
    torch.testing.assert_close(w.sum(1), torch.ones(4))
    assert (w[~valid_mask(lengths, 7)] == 0).all()


def test_gpo_is_max_pooling_with_one_hot_weights(monkeypatch):
    gpo = GPO()
    x, lengths = _features()

    def first_rank(lengths, max_len):  # all weight on the first sorted value
        w = torch.zeros(len(lengths), max_len, 1)
        w[:, 0] = 1
        return w

    monkeypatch.setattr(gpo, "pool_weights", first_rank)
    torch.testing.assert_close(gpo(x, lengths), MaxPool()(x, lengths))


def test_gpo_is_mean_pooling_with_uniform_weights(monkeypatch):
    gpo = GPO()
    x, lengths = _features()

    def uniform(lengths, max_len):
        return (valid_mask(lengths, max_len).float() / lengths[:, None]).unsqueeze(-1)

    monkeypatch.setattr(gpo, "pool_weights", uniform)
    torch.testing.assert_close(gpo(x, lengths), MeanPool()(x, lengths))


def test_pooling_ignores_padding_values():
    x, lengths = _features()
    noisy = x.clone()
    noisy[~valid_mask(lengths, x.size(1))] = 1e4  # garbage in padded slots
    for agg in (GPO(), MeanPool(), MaxPool()):
        torch.testing.assert_close(agg(noisy, lengths), agg(x, lengths))


def test_mean_and_max_against_loops():
    x, lengths = _features()
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(MeanPool()(x, lengths)[b], x[b, :n].mean(0))
        torch.testing.assert_close(MaxPool()(x, lengths)[b], x[b, :n].amax(0))


def test_positional_encoding_values():
    pe = positional_encoding(4, 6)
    assert pe[0, 0] == 0 and pe[0, 1] == 1
    torch.testing.assert_close(pe[3, 2], torch.sin(torch.tensor(3 * 10000 ** (-2 / 6))))


def test_image_head_unit_norm_and_batchnorm_sees_only_real_regions():
    torch.manual_seed(0)
    head = ImageHead(region_dim=12, embed_dim=8)
    head2 = ImageHead(region_dim=12, embed_dim=8)
    head2.load_state_dict(head.state_dict())
    regions = torch.randn(3, 5, 12)
    lengths = torch.tensor([5, 2, 4])
    out = head(regions, lengths)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))
    # the same real regions with more padding give the same output and the same BatchNorm statistics
    padded = torch.cat([regions, torch.randn(3, 4, 12)], 1)
    torch.testing.assert_close(head2(padded, lengths), out)
    torch.testing.assert_close(head2.mlp[1].running_mean, head.mlp[1].running_mean)


def test_text_head_shapes():
    head = TextHead(hidden_dim=10, embed_dim=6)
    out = head(torch.randn(2, 4, 10), torch.tensor([4, 2]))
    assert out.shape == (2, 6)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))


def test_text_backbone_loads_offline_and_masks_padding(tiny_bert_dir, tokenizer):
    bert, tok = load_text_backbone(tiny_bert_dir)
    backbone = TextBackbone(bert).eval()
    ids = torch.tensor(tok(["a dog runs", "a red car on the street"], padding=True)["input_ids"])
    lengths = (ids != 0).sum(1)
    states = backbone(ids, lengths)
    alone = backbone(ids[:1, : lengths[0]], lengths[:1])
    torch.testing.assert_close(states[0, : lengths[0]], alone[0], atol=1e-5, rtol=1e-5)


def test_missing_text_encoder_names_the_path(tmp_path):
    with pytest.raises(ModelFileError, match=str(tmp_path / "nope")):
        load_text_backbone(str(tmp_path / "nope"))
    with pytest.raises(ModelFileError, match="not installed"):
        resolve_model_dir("pkg://no_such_package_xyz/model")


def test_text_layers_truncation(tiny_bert_dir):
    bert, _ = load_text_backbone(tiny_bert_dir, num_layers=1)
    assert len(bert.encoder.layer) == 1


def test_gpo_weights_depend_on_length_only_and_match_per_sample_gru():
    """The once-per-distinct-length GRU equals running the GRU on every sample separately."""
    torch.manual_seed(0)
    gpo = GPO()
    lengths = torch.tensor([5, 3, 5, 1, 3, 7])
    batched = gpo.pool_weights(lengths, 7)
    for b, n in enumerate(lengths.tolist()):
        pe = positional_encoding(n, 32).unsqueeze(0)
        out = gpo.gru(pe)[0]
        out = (out[..., :32] + out[..., 32:]) / 2
        expected = torch.softmax(gpo.score(out).squeeze(-1) / 0.1, dim=1)[0]
        torch.testing.assert_close(batched[b, :n, 0], expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("hidden,heads", [(32, 2), (48, 4)])
def test_packed_bert_gives_the_padded_forwards_states_and_gradients(hidden, heads):
    """BERT on packed real tokens equals transformers' own padded forward: the states of real tokens and every
    parameter's gradient through them, in float64 with dropout off; zeros at padding."""
    from coder.models.text import packable, tiny_bert

    torch.manual_seed(0)
    lengths = torch.tensor([3, 9, 1, 5, 9, 2, 7, 4, 6, 2, 8])  # ties, a one-token caption, unsorted
    ids = torch.randint(5, 1000, (len(lengths), 12))  # wider than the longest caption
    mask = valid_mask(lengths, 12)
    ids[~mask] = 0
    weights = torch.randn(len(lengths), 12, hidden) * mask[..., None]  # a loss that weighs every real token

    def run(packed):
        bert = tiny_bert(vocab_size=1000, hidden=hidden, heads=heads).eval().double()
        assert packable(bert)
        backbone = TextBackbone(bert, packed)
        assert backbone.packed == packed
        states = backbone(ids, lengths)
        (states * weights.double()).sum().backward()
        return states.detach(), {n: p.grad.clone() for n, p in bert.named_parameters() if p.grad is not None}

    ref_states, ref_grads = run(False)
    states, grads = run(True)
    assert states.shape == ref_states.shape
    assert torch.allclose(states[mask], ref_states[mask], atol=1e-10)
    assert (states[~mask] == 0).all()
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, ref_grads[name], atol=1e-9), name


def test_packed_bert_trains_with_dropout_and_falls_back_for_other_variants():
    """In train mode the packed path applies BERT's dropout (two calls differ); a BERT it does not cover
    (relative positions) runs padded."""
    from coder.models.text import tiny_bert

    bert = tiny_bert(vocab_size=100).train()
    ids, lengths = torch.randint(5, 100, (3, 6)), torch.tensor([6, 4, 2])
    backbone = TextBackbone(bert)
    assert not torch.equal(backbone(ids, lengths), backbone(ids, lengths))
    bert.config.position_embedding_type = "relative_key"
    assert not TextBackbone(bert).packed
