"""Caption tokenisation with VSE-infinity's word-corruption augmentation."""
from __future__ import annotations

import numpy as np

# Of the corrupted words: 50% -> [MASK], 10% -> random word-pieces, the remaining 40% deleted (VSE-infinity's word corruption).
MASK_SHARE = 0.5
RANDOM_SHARE = 0.1


def _random_piece_ids(tokenizer, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` uniform vocabulary ids, never a special token ([CLS], [SEP], [PAD], [MASK], [UNK])."""
    specials = np.unique(np.asarray(tokenizer.all_special_ids, dtype=np.int64))
    ids = rng.integers(0, tokenizer.vocab_size - len(specials), size=count)
    # Map the draw onto the vocabulary with the special ids skipped: shift past each one in increasing order.
    for special in specials:
        ids += ids >= special
    return ids


def corrupt_words(pieces: np.ndarray, word_ids: np.ndarray, corruption: float, tokenizer,
                  rng: np.random.Generator) -> np.ndarray:
    """Corrupt each word (all of its word-pieces together) with probability `corruption`."""
    num_words = int(word_ids.max()) + 1
    corrupted = rng.random(num_words) < corruption
    action = rng.random(num_words)
    masked = (corrupted & (action < MASK_SHARE))[word_ids]
    randomised = (corrupted & (action >= MASK_SHARE) & (action < MASK_SHARE + RANDOM_SHARE))[word_ids]
    deleted = (corrupted & (action >= MASK_SHARE + RANDOM_SHARE))[word_ids]
    out = pieces.copy()
    out[masked] = tokenizer.mask_token_id
    out[randomised] = _random_piece_ids(tokenizer, int(randomised.sum()), rng)
    out = out[~deleted]
    # A caption whose every word was deleted would carry no text at all: keep it uncorrupted instead.
    return out if out.size else pieces


def tokenize_caption(tokenizer, caption: str, max_words: int, corruption: float = 0.0,
                     rng: np.random.Generator | None = None) -> list[int]:
    """Token ids `[CLS] pieces [SEP]`, at most `max_words` in total; words corrupted when `corruption` > 0.

    Words are the fast tokenizer's pre-tokenised words (`word_ids()`), so a word split into several
    word-pieces is masked, randomised or deleted as a whole. Raises ValueError when the caption yields
    no word-piece (the datasets re-raise it naming the captions file and line). A word vocabulary (the
    BiGRU's, coder/vocab.py) encodes the caption itself, words corrupted the same way.
    """
    if hasattr(tokenizer, "encode_caption"):
        return tokenizer.encode_caption(caption, max_words, corruption, rng)
    if max_words < 3:
        raise ValueError(f"max_words must be >= 3 ([CLS], one word-piece, [SEP]), got {max_words}")
    if not 0.0 <= corruption <= 1.0:
        raise ValueError(f"word corruption probability must lie in [0, 1], got {corruption}")
    encoding = tokenizer(caption, add_special_tokens=False)
    pieces = np.asarray(encoding["input_ids"], dtype=np.int64)
    if pieces.size == 0:
        raise ValueError(f"caption {caption!r} tokenises to no word-piece")
    if corruption > 0.0:
        word_ids = np.asarray(encoding.word_ids(), dtype=np.int64)
        pieces = corrupt_words(pieces, word_ids, corruption, tokenizer,
                               rng if rng is not None else np.random.default_rng())
    pieces = pieces[: max_words - 2]
    return [tokenizer.cls_token_id, *pieces.tolist(), tokenizer.sep_token_id]
