"""The word vocabulary of the BiGRU text encoder (VSE-infinity's `bigru` branch, `lib/vocab.py`; SCAN, VSRN).

Built from the *training* captions only. VSE++ built its vocabulary with the test captions (fartashf/vsepp
#29) and SCAN's precomp vocabularies, which VSE-infinity's BiGRU branch loads, include the dev captions:
words seen only in dev or test captions are `<unk>` here, as a model trained on the training split has
never seen them.

Words are what `coder.concepts.tokenize` yields (lower case, runs of letters with inner hyphens; digits and
punctuation dropped), the one tokenisation the concept vocabulary uses too. A word enters the vocabulary
when it occurs at least `min_count` times in the training captions (VSE-infinity's threshold: 4); the
words follow falling count, ties alphabetically, after the specials:

    0 <pad>    padding (collate pads with 0)
    1 <mask>   a word masked by the caption augmentation (VSE-infinity's cloze token)
    2 <start>  opens every caption
    3 <end>    closes every caption
    4 <unk>    any word not in the vocabulary

A caption is `<start> w_1 ... w_n <end>`, cut to `max_words` ids in all; a caption with no known word (or no
word at all) still encodes as `<start> <unk> ... <end>` (or `<start> <end>`).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np

from .concepts import read_glove, tokenize
from .errors import CoderError, MissingFileError, VocabularyError

SPECIALS = ("<pad>", "<mask>", "<start>", "<end>", "<unk>")
PAD, MASK, START, END, UNK = range(len(SPECIALS))
# Of the corrupted words: 50% -> <mask>, 10% -> a random word, the remaining 40% deleted (VSE-infinity's
# `process_caption` with drop=True, each word with probability `data.word_corruption`, 0.2 there).
MASK_SHARE, RANDOM_SHARE = 0.5, 0.1
FORMAT = "coder-word-vocabulary"


class WordVocabulary:
    """Words <-> ids (`SPECIALS` first) and the caption encoding the datasets call (`encode_caption`)."""

    def __init__(self, words: Iterable[str], min_count: int = 1, source: str = ""):
        self.words = list(words)
        if tuple(self.words[:len(SPECIALS)]) != SPECIALS:
            raise VocabularyError(f"vocabulary {source or '(in memory)'}: must start with the specials {SPECIALS}, "
                                  f"got {self.words[:len(SPECIALS)]}")
        self.index = {w: i for i, w in enumerate(self.words)}
        if len(self.index) != len(self.words):
            raise VocabularyError(f"vocabulary {source or '(in memory)'}: a word appears twice")
        self.min_count, self.source = min_count, source

    def __len__(self) -> int:
        return len(self.words)

    def __eq__(self, other) -> bool:
        return isinstance(other, WordVocabulary) and self.words == other.words

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 4, source: str = "") -> WordVocabulary:
        """Every word of `captions` that occurs at least `min_count` times, by falling count (ties alphabetically)."""
        counts = Counter(w for caption in captions for w in tokenize(caption))
        kept = sorted((w for w, n in counts.items() if n >= min_count and w not in SPECIALS),
                      key=lambda w: (-counts[w], w))
        return cls([*SPECIALS, *kept], min_count, source)

    @classmethod
    def from_split(cls, root: str | Path, split: str, min_count: int = 4) -> WordVocabulary:
        """The vocabulary of `<root>/<split>_caps.txt`: call it with the training split only."""
        from .data.precomp import read_lines, require_split

        require_split(root, split)
        path = Path(root) / f"{split}_caps.txt"
        return cls.build(read_lines(path), min_count, source=str(path))

    # ------------------------------------------------------------------------------------ encoding
    def ids(self, caption: str) -> list[int]:
        return [self.index.get(w, UNK) for w in tokenize(caption)]

    def encode_caption(self, caption: str, max_words: int, corruption: float = 0.0,
                       rng: np.random.Generator | None = None) -> list[int]:
        """`<start> ids <end>`, at most `max_words` ids; words corrupted with probability `corruption`."""
        if max_words < 3:
            raise ValueError(f"max_words must be >= 3 (<start>, one word, <end>), got {max_words}")
        if not 0.0 <= corruption <= 1.0:
            raise ValueError(f"word corruption probability must lie in [0, 1], got {corruption}")
        ids = np.asarray(self.ids(caption), dtype=np.int64)
        if corruption > 0.0 and ids.size:
            ids = self.corrupt(ids, corruption, rng if rng is not None else np.random.default_rng())
        return [START, *ids[: max_words - 2].tolist(), END]

    def corrupt(self, ids: np.ndarray, corruption: float, rng: np.random.Generator) -> np.ndarray:
        """VSE-infinity's word augmentation: each word with probability `corruption` is masked (50%),
        replaced by a uniform random vocabulary word (10%; specials never drawn) or deleted (40%).
        <start> and <end> are never corrupted (VSE-infinity also draws on them)."""
        corrupted = rng.random(ids.size) < corruption
        action = rng.random(ids.size)
        masked = corrupted & (action < MASK_SHARE)
        randomised = corrupted & (action >= MASK_SHARE) & (action < MASK_SHARE + RANDOM_SHARE)
        deleted = corrupted & (action >= MASK_SHARE + RANDOM_SHARE)
        out = ids.copy()
        out[masked] = MASK
        if randomised.any():
            if len(self) > len(SPECIALS):
                out[randomised] = rng.integers(len(SPECIALS), len(self), size=int(randomised.sum()))
            else:
                out[randomised] = UNK
        return out[~deleted]

    # ------------------------------------------------------------------------------------ storage
    def state(self) -> dict:
        """Plain data (a checkpoint loads it with weights_only=True)."""
        return {"format": FORMAT, "words": list(self.words), "min_count": self.min_count, "source": self.source}

    @classmethod
    def from_state(cls, state, where: str) -> WordVocabulary:
        if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("words"), list) \
                or not all(isinstance(w, str) for w in state["words"]):
            raise VocabularyError(f"{where}: not a coder word vocabulary (expected a JSON object with "
                                  f"format '{FORMAT}' and a list of words)")
        return cls(state["words"], int(state.get("min_count", 1)), where)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.state(), ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> WordVocabulary:
        """A vocab.json written by `save` (a run folder's); missing, truncated or foreign is one error naming it."""
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"word vocabulary not found: {path} (a run folder's vocab.json; leave "
                                   f"model.bigru.vocab empty to build it from the training captions)")
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise VocabularyError(f"{path}: unreadable or truncated word vocabulary ({type(err).__name__}: "
                                  f"{' '.join(str(err).split())})") from None
        return cls.from_state(state, str(path))


def glove_matrix(vocab: WordVocabulary, path: str | Path, dim: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """(len(vocab), dim) word vectors: GloVe's row for each vocabulary word it holds, uniform +-0.1 for the
    rest (VSE-infinity's `init_weights`); returns (matrix, number of words covered). A missing, truncated or
    non-finite file, or one of another width, is a one-line error naming it."""
    try:
        vectors, width = read_glove(path, vocab.words[len(SPECIALS):])
    except CoderError as err:
        if isinstance(err, MissingFileError):
            raise MissingFileError(f"word vectors file not found: {path} (model.bigru.glove: a GloVe text "
                                   f"file, e.g. glove.840B.300d.txt; empty = random init)") from None
        raise VocabularyError(f"model.bigru.glove: {' '.join(str(err).split())}") from None
    if width != dim:
        raise VocabularyError(f"{path}: {width}-d word vectors, but model.bigru.word_dim is {dim}")
    matrix = rng.uniform(-0.1, 0.1, size=(len(vocab), dim)).astype(np.float32)
    for word, vector in vectors.items():
        matrix[vocab.index[word]] = vector
    return matrix, len(vectors)
