"""The packed BERT needs no attribute newer than the transformers floor (pyproject.toml): releases before 5
have no `BertSelfAttention.scaling`, so the scale comes from the head size when it is absent."""
import torch

from coder.models.text import attention_scale, packed_bert, tiny_bert


def test_packed_bert_without_the_scaling_attribute_gives_the_same_states():
    bert = tiny_bert(vocab_size=60, hidden=32, layers=2, heads=4).eval()
    ids = torch.randint(5, 60, (3, 7), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([7, 4, 2])
    expected = packed_bert(bert, ids, lengths)
    for layer in bert.encoder.layer:
        del layer.attention.self.scaling  # as BertSelfAttention of transformers 4.x
    assert attention_scale(bert.encoder.layer[0].attention.self) == 8 ** -0.5  # head size 32 / 4
    torch.testing.assert_close(packed_bert(bert, ids, lengths), expected, rtol=0, atol=0)
