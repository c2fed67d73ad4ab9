"""The BiGRU text backbone (VSE-infinity's `bigru` branch, `lib/encoders.py` `EncoderText`; SCAN, VSRN, CVSE).

Word ids (B, T) -> word embeddings (300-d) -> a bidirectional GRU (1 layer, 1024 per direction) whose two
directions are averaged (or concatenated) -> token states (B, T, H), zeros at padding. The text head then
pools them with GPO and L2-normalises, as for BERT. The vocabulary (coder/vocab.py) is part of the module's
state (`get_extra_state`), so every checkpoint carries it and evaluates with nothing else.

Packing reads only what collate computed on the CPU (`Lengths.descending`, `order`, `restore`): the rows are
put in length order on the device, packed with CPU lengths, and put back, so no length is read back from
the device during a training step.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..errors import VocabularyError
from ..lengths import Lengths, as_lengths
from ..vocab import WordVocabulary, glove_matrix
from .text import load_text_backbone

MERGES = ("mean", "concat")  # model.bigru.merge: VSE-infinity averages the two directions


class BiGRUBackbone(nn.Module):
    """Word ids + lengths -> token states (B, T, H); H = hidden (merge mean) or 2 x hidden (concat)."""

    def __init__(self, vocab: WordVocabulary, word_dim: int = 300, hidden: int = 1024, layers: int = 1,
                 merge: str = "mean"):
        super().__init__()
        if merge not in MERGES:
            raise ValueError(f"BiGRU merge must be one of {MERGES}, got {merge!r}")
        self.vocab, self.merge = vocab, merge
        self.embed = nn.Embedding(len(vocab), word_dim, padding_idx=None)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)  # VSE-infinity's init_weights
        self.gru = nn.GRU(word_dim, hidden, layers, batch_first=True, bidirectional=True)
        self.hidden_dim = hidden if merge == "mean" else 2 * hidden

    @torch.no_grad()
    def load_word_vectors(self, matrix: np.ndarray) -> None:
        self.embed.weight.copy_(torch.as_tensor(matrix, dtype=self.embed.weight.dtype))

    def forward(self, input_ids: Tensor, lengths: Tensor | Lengths) -> Tensor:
        width = input_ids.size(1)
        lengths = as_lengths(lengths, input_ids, width)
        x = self.embed(input_ids.index_select(0, lengths.order))  # longest first, as packing wants
        packed = pack_padded_sequence(x, lengths.descending, batch_first=True, enforce_sorted=True)
        out = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=width)[0]
        if self.merge == "mean":
            half = out.size(-1) // 2
            out = (out[..., :half] + out[..., half:]) / 2
        return out.index_select(0, lengths.restore)  # back to the batch's order

    # the vocabulary travels in the state dict (model_best.pth, checkpoint_last.pth): plain data
    def get_extra_state(self) -> dict:
        return self.vocab.state()

    def set_extra_state(self, state) -> None:
        vocab = WordVocabulary.from_state(state, "the checkpoint's word vocabulary")
        if vocab != self.vocab:
            raise VocabularyError(
                f"the checkpoint's word vocabulary ({len(vocab)} words) differs from this model's "
                f"({len(self.vocab)} words, built from {self.vocab.source or 'memory'}): resume needs the "
                f"training captions the run started with")


def build_bigru(cfg: dict, vocab: WordVocabulary, log=print, seed: int = 0) -> BiGRUBackbone:
    """The backbone of a `model` config; word vectors from `model.bigru.glove` when it names a file."""
    gcfg = cfg["bigru"]
    backbone = BiGRUBackbone(vocab, gcfg["word_dim"], gcfg["hidden"], gcfg["layers"], gcfg["merge"])
    if gcfg["glove"]:
        matrix, covered = glove_matrix(vocab, gcfg["glove"], gcfg["word_dim"], np.random.default_rng(seed))
        backbone.load_word_vectors(matrix)
        log(f"BiGRU word vectors: {covered} of {len(vocab) - 5} vocabulary words from {gcfg['glove']}, "
            f"the rest uniform +-0.1")
    return backbone


def training_vocabulary(cfg: dict) -> WordVocabulary:
    """`model.bigru.vocab` when it names a vocab.json, else the training split's words (never dev or test)."""
    gcfg, data = cfg["model"]["bigru"], cfg["data"]
    if gcfg["vocab"]:
        return WordVocabulary.load(gcfg["vocab"])
    return WordVocabulary.from_split(data["root"], data["train_split"], gcfg["min_count"])


def checkpoint_vocabulary(state_dict: dict) -> WordVocabulary:
    key = "text_encoder.backbone._extra_state"
    if key not in state_dict:
        raise VocabularyError(f"the checkpoint has no word vocabulary ('{key}'): not a BiGRU model's checkpoint")
    return WordVocabulary.from_state(state_dict[key], "the checkpoint's word vocabulary")


def load_text(cfg: dict, state_dict: dict | None = None, log=print):
    """(text backbone, tokenizer) of a resolved config: BERT and its word-piece tokenizer (model.text_encoder),
    or the BiGRU and its word vocabulary. With a checkpoint's `state_dict` the BiGRU's vocabulary is the
    checkpoint's (its weights come with load_state_dict); otherwise it is built from the training captions."""
    model = cfg["model"]
    if model["text_backbone"] == "bert":
        return load_text_backbone(model["text_encoder"], model["text_layers"])
    if state_dict is not None:
        vocab = checkpoint_vocabulary(state_dict)
        model = {**model, "bigru": {**model["bigru"], "glove": ""}}  # the trained vectors are the checkpoint's
    else:
        vocab = training_vocabulary(cfg)
    return build_bigru(model, vocab, log, cfg["train"]["seed"]), vocab
