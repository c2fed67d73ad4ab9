"""The offline concept-vocabulary builder (CODER §3.2; the vocabulary and graph as CVSE [49]), run once per
data set by scripts/build_concepts.py (and by the demo on first use); the model only loads its output
(`coder.concepts.load_concepts`).

From the *training* captions only: g concepts (default 280 nouns, 80 adjectives, 40 verbs, each block
by falling caption frequency, as in CVSE's vocabulary which CODER follows), how many captions contain
each concept, their caption-level co-occurrence counts and their GloVe vectors. Saved as
``concepts.npz`` + ``concepts.json`` (never pickle).

Parts of speech: if ``nltk`` and its perceptron tagger data are importable, each word takes the tag it
carries most often in the captions. Otherwise a small built-in heuristic is used (documented in
``heuristic_pos``); the JSON says which method was used.
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..concepts import ConceptVocabulary, read_glove, tokenize  # shared with the BiGRU's vocabulary
from ..data.precomp import read_lines
from ..errors import ConceptError, MissingFileError

POS_ORDER = ("noun", "adj", "verb")
# CVSE's split of 400 concepts (210/60/30 of 300 in its release, 280/80/40 of CODER's g = 400).
DEFAULT_QUOTAS = {"noun": 280, "adj": 80, "verb": 40}
MISSING_POLICY = "dropped; replaced by the next most frequent word of the same part of speech"

# Closed-class words never used as concepts. Auxiliaries (is/are/has...) are *not* here: CVSE's
# published vocabularies list them as verbs, so they compete as verbs like any other.
STOP_WORDS = frozenset("""
a an the and or but nor of in on at to for with without within by from into onto over under up down
out off near behind beside besides between through across along alongside around about above below
beneath underneath inside outside against toward towards upon among amongst via past while as than
then there here this that these those it its itself they them their themselves he him his himself
she her hers herself we us our ours you your yours i me my mine who whom whose which what where when
how why if so not no yes very too also just only even still some any all each both another every
either neither such own one two three four five six seven eight nine ten eleven twelve dozen hundred
first second third together away nearby alone ahead s t n etc
""".split())

# Built-in adjective lexicon for the heuristic: colours, sizes, ages, quantities, materials/surfaces,
# weather, nationalities and other frequent caption modifiers.
ADJECTIVES = frozenset("""
white black blue red green yellow brown gray grey orange pink purple tan dark light bright colorful
colourful blond blonde silver golden beige maroon turquoise violet navy teal khaki multicolored
large small big little tiny huge giant tall short long high low wide narrow thick thin
young old older elderly younger oldest youngest middle-aged aged adult
other several many few various different next same empty full open closed clean dirty wet dry hot
cold warm cool sunny snowy rainy cloudy foggy busy crowded grassy rocky sandy muddy dusty shallow
deep wooden lush modern clear nice beautiful pretty cute happy sad ready hard soft heavy fresh
striped plaid checkered spotted patterned shiny fancy female male asian african american indian
chinese japanese mexican european outdoor indoor public single double multiple whole right left
professional traditional tropical electric square round flat steep calm sleeveless shirtless
""".split())

# Frequent caption verbs that are not -ing forms (ambiguous noun/verb forms such as watch, wave,
# show, drink are left out on purpose: in captions they are mostly nouns).
VERBS = frozenset("""
is are was were be been am has have had do does did
sit sits sat stand stands stood look looks play plays hold holds held wear wears walk walks run runs
ride rides jump jumps wait waits work works talk talks smile smiles carry carries take takes eat
eats lay lays lie lies pose poses throw throws catch catches climb climbs swim swims perform performs
read reads use uses get gets go goes make makes prepare prepares cook cooks cut cuts dance dances
sing sings lean leans push pushes pull pulls kick kicks hit hits fly flies sleep sleeps
dressed parked covered filled topped stacked seated lined surrounded painted loaded decorated made
shown seen eaten displayed placed attached mounted gathered posed
""".split())

# Nouns ending in -ing (so the -ing verb rule does not claim them).
ING_NOUNS = frozenset("""
building clothing ceiling railing ring king thing something nothing anything everything evening
morning wedding string spring swing wing sibling pudding awning icing frosting topping stuffing
dressing bedding siding lightning earring sling parking seating lighting housing fencing ping
""".split())

ADJ_SUFFIXES = ("ful", "ous", "less")
def read_captions(path: str | Path) -> list[str]:
    """One caption per line, UTF-8; an empty line is an error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"captions file not found: {path}")
    captions = read_lines(path)  # the data set's own reader: both see the same lines
    for line_no, caption in enumerate(captions, start=1):
        if not caption.strip():
            raise ConceptError(f"{path}:{line_no}: empty caption")
    return captions


def heuristic_pos(word: str) -> str | None:
    """Part of speech without a tagger; None for stop words and non-words.

    Rules in order: stop word or shorter than 2 letters -> None; built-in adjective lexicon or an
    adjective suffix (-ful, -ous, -less; 6+ letters) -> "adj"; built-in verb lexicon or an -ing form
    (5+ letters, not a known -ing noun) -> "verb"; everything else -> "noun".
    """
    if len(word) < 2 or word in STOP_WORDS:
        return None
    if word in ADJECTIVES or (len(word) >= 6 and word.endswith(ADJ_SUFFIXES)):
        return "adj"
    if word in VERBS or (len(word) >= 5 and word.endswith("ing") and word not in ING_NOUNS):
        return "verb"
    return "noun"


def _penn_to_pos(tag: str) -> str | None:
    if tag.startswith("NN"):
        return "noun"
    if tag.startswith("JJ"):
        return "adj"
    if tag.startswith("VB"):
        return "verb"
    return None


NLTK_HINT = ("pip install nltk, then on a machine with network: python -m nltk.downloader "
             "averaged_perceptron_tagger_eng (copy ~/nltk_data to an offline machine, or set NLTK_DATA)")


def nltk_tagger():
    """``nltk.pos_tag_sents`` if nltk and its tagger data are installed, else None (nothing downloads)."""
    return _nltk_tagger()[0]


def _nltk_tagger():
    """(tagger or None, why not): the reason names the missing package or data file."""
    try:
        import nltk

        nltk.pos_tag_sents([["a", "dog"]])
    except ImportError as err:
        return None, f"nltk is not installed ({err})"
    except LookupError as err:
        return None, "nltk's tagger data is missing: " + " ".join(str(err).split())[:300]
    return nltk.pos_tag_sents, ""


def tag_words(tokenized: Sequence[Sequence[str]], method: str = "auto") -> tuple[dict[str, str], str]:
    """Map every word of the captions to noun/adj/verb (stop words left out); returns (tags, method)."""
    if method not in ("auto", "heuristic", "nltk"):
        raise ConceptError(f"pos method must be auto, heuristic or nltk, got {method!r}")
    pos_tag_sents, why = _nltk_tagger() if method != "heuristic" else (None, "")
    if method == "nltk" and pos_tag_sents is None:
        raise ConceptError(f"pos method 'nltk' asked for, but {why}; {NLTK_HINT}")
    if pos_tag_sents is None:
        if method == "auto":  # never silent: the heuristic tags e.g. "waves" in "a woman waves" as a noun
            print(f"warning: POS tagging falls back to a suffix heuristic because {why}. For a real tagger: "
                  f"{NLTK_HINT}. The method used is stored in concepts.json (pos_method).", file=sys.stderr)
        tags = {w: heuristic_pos(w) for w in {w for tokens in tokenized for w in tokens}}
        return {w: p for w, p in tags.items() if p is not None}, "heuristic"
    # Majority Penn tag of each word over all its occurrences (ties: first seen).
    votes: dict[str, Counter] = {}
    for tagged in pos_tag_sents([list(tokens) for tokens in tokenized]):
        for word, tag in tagged:
            votes.setdefault(word, Counter())[tag] += 1
    tags = {}
    for word, counter in votes.items():
        pos = _penn_to_pos(counter.most_common(1)[0][0])
        if pos is not None and len(word) >= 2 and word not in STOP_WORDS:
            tags[word] = pos
    return tags, "nltk"


def caption_frequency(tokenized: Iterable[Sequence[str]]) -> Counter:
    """How many captions contain each word (a word counts once per caption)."""
    freq: Counter = Counter()
    for tokens in tokenized:
        freq.update(set(tokens))
    return freq


def cooccurrence_counts(
    tokenized: Sequence[Sequence[str]], words: Sequence[str], chunk_size: int = 8192
) -> tuple[np.ndarray, np.ndarray]:
    """(counts (g,), cooccurrence (g, g)) int64: captions containing word i / both i and j (i != j).

    The caption x concept incidence matrix is built in chunks and multiplied by its transpose, so
    COCO's 566k captions never need a dense (N, g) matrix at once.
    """
    index = {w: i for i, w in enumerate(words)}
    g = len(words)
    cooc = np.zeros((g, g), dtype=np.int64)
    for start in range(0, len(tokenized), chunk_size):
        chunk = tokenized[start:start + chunk_size]
        incidence = np.zeros((len(chunk), g), dtype=np.float64)
        for row, tokens in enumerate(chunk):
            cols = [index[w] for w in set(tokens) if w in index]
            incidence[row, cols] = 1.0
        cooc += np.rint(incidence.T @ incidence).astype(np.int64)  # exact: counts < 2**53
    counts = np.diagonal(cooc).copy()
    np.fill_diagonal(cooc, 0)
    return counts, cooc


def scaled_quotas(num_concepts: int) -> dict[str, int]:
    """280/80/40 of 400 scaled to num_concepts (rounding remainder goes to nouns)."""
    if num_concepts < 1:
        raise ConceptError(f"num_concepts must be >= 1, got {num_concepts}")
    total = sum(DEFAULT_QUOTAS.values())
    quotas = {p: DEFAULT_QUOTAS[p] * num_concepts // total for p in ("adj", "verb")}
    quotas["noun"] = num_concepts - quotas["adj"] - quotas["verb"]
    return {p: quotas[p] for p in POS_ORDER}


def select_with_vectors(pools: dict[str, list[str]], quotas: dict[str, int], vectors: dict
                        ) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """Per part of speech, the most frequent words that have a GloVe vector, up to its quota; the skipped
    words without one are reported."""
    words, pos, missing = [], [], {}
    for p in POS_ORDER:
        chosen, skipped = [], []
        for w in pools[p]:
            if len(chosen) == quotas[p]:
                break
            (chosen if w in vectors else skipped).append(w)
        words += chosen
        pos += [p] * len(chosen)
        missing[p] = skipped
    return words, pos, missing


def build_vocabulary(
    captions: Sequence[str],
    glove_path: str | Path,
    num_concepts: int = 400,
    pos_method: str = "auto",
    source: str = "",
) -> ConceptVocabulary:
    """Select concepts per part of speech by caption frequency, keeping only words GloVe knows.

    A word without a GloVe vector is dropped and the next most frequent word of its part of speech
    takes its place; when a part of speech runs out of words, g shrinks and ``info`` says so.
    """
    quotas = scaled_quotas(num_concepts)
    tokenized = [tokenize(c) for c in captions]
    tags, method = tag_words(tokenized, pos_method)
    freq = caption_frequency(tokenized)
    ranked = sorted(tags, key=lambda w: (-freq[w], w))  # falling frequency, ties alphabetical
    pools = {p: [w for w in ranked if tags[w] == p] for p in POS_ORDER}
    vectors, dim = read_glove(glove_path, ranked)

    words, pos, missing = select_with_vectors(pools, quotas, vectors)
    if not words:
        raise ConceptError(f"no concept word with a GloVe vector found (captions: {source}, GloVe: {glove_path})")
    counts, cooc = cooccurrence_counts(tokenized, words)
    selected = {p: pos.count(p) for p in POS_ORDER}
    info = {
        "num_concepts": len(words),
        "num_concepts_requested": num_concepts,
        "shrunk": len(words) < num_concepts,
        "requested_per_pos": quotas,
        "selected_per_pos": selected,
        "pos_method": method,
        "pos_method_note": (
            "nltk.pos_tag, majority tag per word over all captions" if method == "nltk" else
            "no tagger: built-in stop-word, adjective and verb lexicons, -ful/-ous/-less -> adjective, "
            "-ing -> verb, rest -> noun (see coder.tools.vocabulary.heuristic_pos)"
        ),
        "ranking": "captions containing the word, falling; ties alphabetical",
        "source_captions": str(source),
        "num_captions": len(captions),
        "glove_file": str(glove_path),
        "glove_dim": dim,
        "missing_glove_words": missing,
        "missing_policy": MISSING_POLICY,
        "words": words,
        "pos": pos,
    }
    if info["shrunk"]:
        info["shrunk_note"] = (
            f"only {len(words)} usable concept words (per part of speech: {selected}, asked {quotas})"
        )
    return ConceptVocabulary(np.array(words, dtype=str), np.array(pos, dtype=str), counts, cooc,
                             np.stack([vectors[w] for w in words]).astype(np.float32), info)


def build_concepts(
    root: str | Path,
    glove_path: str | Path,
    split: str = "train",
    output_dir: str | Path | None = None,
    num_concepts: int = 400,
    pos_method: str = "auto",
) -> ConceptVocabulary:
    """Build from ``<root>/<split>_caps.txt`` (train only) and save into output_dir (default root)."""
    if split != "train":
        raise ConceptError(
            f"concepts are built from the training captions only (split 'train'), got split {split!r}: "
            "dev/test captions must not leak into the model"
        )
    captions_path = Path(root) / f"{split}_caps.txt"
    vocab = build_vocabulary(read_captions(captions_path), glove_path, num_concepts, pos_method,
                             source=str(captions_path))
    vocab.save(Path(output_dir) if output_dir is not None else Path(root))
    return vocab
