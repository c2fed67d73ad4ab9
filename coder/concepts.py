"""Concept vocabulary of CODER's concept branch (paper §3.2; the graph as CVSE [49]): the file format and its
loader, all the model needs at run time.

``concepts.npz`` holds, in vocabulary order, the g concept words, their parts of speech, how many training
captions contain each, their caption-level co-occurrence counts and their GloVe vectors; ``concepts.json``
beside it records how they were chosen (never pickle). The offline builder that writes them from the training
captions is `coder.tools.vocabulary` (scripts/build_concepts.py).
"""
from __future__ import annotations

import json
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from .errors import ConceptError, MissingFileError

__all__ = ["ConceptError", "ConceptVocabulary", "load_concepts"]


@dataclass
class ConceptVocabulary:
    """The concept-branch inputs (§3.2); arrays in vocabulary order."""

    words: np.ndarray  # (g,) str
    pos: np.ndarray  # (g,) str: noun / adj / verb
    counts: np.ndarray  # (g,) int64, captions containing the concept
    cooccurrence: np.ndarray  # (g, g) int64, zero diagonal, symmetric
    glove: np.ndarray  # (g, d) float32
    info: dict  # what concepts.json records

    def save(self, output_dir: str | Path) -> tuple[Path, Path]:
        """Write ``concepts.npz`` and ``concepts.json`` into output_dir."""
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        npz_path, json_path = output_dir / "concepts.npz", output_dir / "concepts.json"
        np.savez(npz_path, words=self.words, pos=self.pos, counts=self.counts,
                 cooccurrence=self.cooccurrence, glove=self.glove)
        json_path.write_text(json.dumps(self.info, indent=2) + "\n", encoding="utf-8")
        return npz_path, json_path


# The one tokenisation of captions into words, shared by the concept vocabulary (coder/tools/vocabulary.py)
# and the BiGRU's word vocabulary (coder/vocab.py), and the one GloVe reader of both.
_TOKEN = re.compile(r"[a-z]+(?:-[a-z]+)*")


def tokenize(caption: str) -> list[str]:
    """Lower-cased word tokens; hyphenated words (t-shirt) stay whole, digits and punctuation go."""
    return _TOKEN.findall(caption.lower())


GLOVE_HINT = (
    "download glove.6B.zip from https://nlp.stanford.edu/projects/glove/ and unzip "
    "glove.6B.300d.txt (the paper's 300-d vectors), or for the demo run scripts/export_demo_glove.py"
)


def read_glove(path: str | Path, words: Iterable[str]) -> tuple[dict[str, np.ndarray], int]:
    """Stream a GloVe text file ("word v1 ... vd" per line) and keep only the rows of ``words``.

    d is read from the first line. Every line is width-checked; a missing file, an undecodable or
    wrong-width line, or a non-number or non-finite value in a kept row is an error naming the file (and
    line). Returns (vectors, d).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"GloVe file not found: {path}; {GLOVE_HINT}")
    wanted = set(words)
    vectors: dict[str, np.ndarray] = {}
    dim = 0
    line_no = 0
    with path.open("rb") as handle:  # bytes, decoded per line, so a bad byte gets its own line number
        for line_no, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ConceptError(f"{path}:{line_no}: not UTF-8 text ({err.reason})") from None
            word, _, rest = line.rstrip().partition(" ")
            width = rest.count(" ") + 1 if rest else 0
            if line_no == 1:
                dim = width
                if dim < 2:
                    raise ConceptError(
                        f"{path}:1: expected 'word v1 ... vd' (GloVe text format), got {width} "
                        "value(s); a word2vec header line is not supported"
                    )
            if width != dim:
                raise ConceptError(f"{path}:{line_no}: expected {dim} values, got {width}")
            if word in wanted and word not in vectors:
                try:
                    vectors[word] = np.array(rest.split(" "), dtype=np.float32)
                except ValueError as err:
                    raise ConceptError(f"{path}:{line_no}: unreadable vector ({err})") from None
                if not np.isfinite(vectors[word]).all():  # "nan", "inf" or past float32's 3.4e38
                    raise ConceptError(f"{path}:{line_no}: the vector of {word!r} holds non-finite values "
                                       "(NaN or inf)")
    if line_no == 0:
        raise ConceptError(f"{path}: empty GloVe file; {GLOVE_HINT}")
    return vectors, dim


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz archive; an unreadable archive (truncated, not a zip, pickled objects) or
    a missing key is an error naming the file."""
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise ConceptError(f"{path}: cannot be read as an .npz archive ({type(err).__name__}: {err})") from err
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ConceptError(f"{path}: expected an .npz archive of arrays, got a single array")
    missing = {"words", "pos", "counts", "cooccurrence", "glove"} - set(arrays)
    if missing:
        raise ConceptError(f"{path}: missing key(s) {sorted(missing)}")
    for key in ("counts", "cooccurrence", "glove"):
        if arrays[key].dtype.kind not in "biuf":
            raise ConceptError(f"{path}: key {key!r} has dtype {arrays[key].dtype}, expected numbers")
    return arrays


def _check_rows(path: Path, key: str, bad: np.ndarray, what: str) -> None:
    """No row of `bad` (a boolean array, one row per concept) is set; else an error naming key and row."""
    rows = np.flatnonzero(bad.reshape(len(bad), -1).any(axis=1))
    if rows.size:
        raise ConceptError(f"{path}: key {key!r} row {rows[0]} holds {what}")


def _read_info(json_path: Path) -> dict:
    if not json_path.is_file():
        return {}
    try:
        info = json.loads(json_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ConceptError(f"{json_path}: not valid JSON ({err})") from err
    if not isinstance(info, dict):
        raise ConceptError(f"{json_path}: expected a JSON object, got {type(info).__name__}")
    return info


def load_concepts(path: str | Path) -> ConceptVocabulary:
    """Read ``concepts.npz`` (and the ``concepts.json`` beside it when present), checking shapes and values:
    the graph (counts, co-occurrences) and the GloVe vectors are read once here and must be finite."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"concepts file not found: {path}; build it with scripts/build_concepts.py")
    arrays = _read_npz(path)
    g = arrays["words"].shape[0] if arrays["words"].ndim else 0
    if g == 0:
        raise ConceptError(f"{path}: key 'words' holds no concept (shape {arrays['words'].shape})")
    expected = {"words": (g,), "pos": (g,), "counts": (g,), "cooccurrence": (g, g)}
    for key, shape in expected.items():
        if arrays[key].shape != shape:
            raise ConceptError(f"{path}: key {key!r} has shape {arrays[key].shape}, expected {shape}")
    if arrays["glove"].ndim != 2 or arrays["glove"].shape[0] != g or arrays["glove"].shape[1] == 0:
        raise ConceptError(f"{path}: key 'glove' has shape {arrays['glove'].shape}, expected ({g}, d)")
    glove = arrays["glove"].astype(np.float32)  # X of the GCN (§3.2); float64 past 3e38 would turn inf here
    _check_rows(path, "glove", ~np.isfinite(glove), "non-finite values (NaN or inf)")
    for key in ("counts", "cooccurrence"):  # the graph (CVSE [49]): finite, non-negative counts
        _check_rows(path, key, ~np.isfinite(arrays[key]), "non-finite values (NaN or inf)")
        _check_rows(path, key, arrays[key] < 0, "negative counts")
    return ConceptVocabulary(arrays["words"], arrays["pos"], arrays["counts"].astype(np.int64),
                             arrays["cooccurrence"].astype(np.int64), glove, _read_info(path.with_suffix(".json")))
