"""Precomputed region features in the SCAN/VSE-infinity "precomp" format.

A folder `root` holds per split S: `S_ims.npy` float32 (rows, regions, dim), `S_caps.txt` (one caption
per line, the captions of an image consecutive), optional `S_ids.txt` (one id per row) and `S_clip.npy`
float32 (rows, clip_dim) for USER. Features stay memory-mapped and are read one row per item, so the
resident memory grows with the batch, not with the data set (COCO train is 33 GB).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .text import tokenize_caption
from ..errors import DataError


def _expected_tree(root: Path, split: str) -> str:
    return (f"expected tree: {root}/{split}_ims.npy (float32, rows x regions x dim), "
            f"{root}/{split}_caps.txt (one caption per line), optional {split}_ids.txt (one id per row) "
            f"and {split}_clip.npy (float32, rows x clip_dim); see data/README.md")


def require_split(root: str | Path, split: str) -> None:
    """A split's features and captions exist, or a DataError names the first file missing."""
    for path in (Path(root) / f"{split}_ims.npy", Path(root) / f"{split}_caps.txt"):
        if not path.is_file():
            raise DataError(f"missing {path}; {_expected_tree(Path(root), split)}")


def _open_npy(path: Path, rank: int) -> np.ndarray:
    """Memory-map a float32 .npy array (only its header is read) and check its rank and dtype."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot be read as a .npy array ({err})") from err
    if not isinstance(array, np.ndarray) or array.ndim != rank:
        shape = getattr(array, "shape", type(array).__name__)
        raise DataError(f"{path}: expected a rank-{rank} array, got shape {shape}")
    if array.dtype != np.float32:
        raise DataError(f"{path}: expected dtype float32, got {array.dtype} (shape {array.shape})")
    return array


def read_lines(path: Path) -> list[str]:
    """The stripped lines of a UTF-8 text file (split on newlines only, not on Unicode separators)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 ({err})") from err
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the final newline ends the last line, it does not start a new one
    return [line.strip() for line in lines]


def _non_finite_row(path: Path, row: int) -> DataError:
    return DataError(f"{path}: row {row} holds non-finite values (NaN or inf)")


def _row_values(array: np.ndarray, row: int, path: Path) -> np.ndarray:
    """Copy one row out of a memory-mapped array; non-finite values are an error naming file and row.
    Region features are checked here, per row read: a check of the whole file at start would read all
    of it (COCO train: 33 GB) before the first step."""
    values = np.array(array[row], dtype=np.float32)
    if not np.isfinite(values).all():
        raise _non_finite_row(path, row)
    return values


def check_finite_rows(array: np.ndarray, path: Path, chunk_bytes: int = 64 << 20) -> None:
    """The whole array is finite, read in chunks of rows (a memory map stays cheap); otherwise an error
    naming the file and its first bad row. For arrays small enough to read once at load (CLIP features)."""
    rows = max(1, chunk_bytes // max(1, array[:1].nbytes))
    for start in range(0, len(array), rows):
        finite = np.isfinite(array[start:start + rows]).reshape(min(rows, len(array) - start), -1).all(axis=1)
        if not finite.all():
            raise _non_finite_row(path, start + int(np.argmin(finite)))


def drop_regions(regions: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    """Drop each region with probability p, keeping the order of the rest and at least one region."""
    keep = rng.random(len(regions)) >= p
    if not keep.any():
        keep[rng.integers(len(regions))] = True
    return regions[keep]


class PrecompSplit:
    """The validated files of one split; the shared reader behind every precomp dataset.

    Row rule: with as many rows as captions, caption i uses row i; otherwise the captions must be a
    multiple of the rows and caption i uses row i // (captions // rows). The image of caption i is
    i // captions_per_image; image k is encoded once, from the row of caption k * captions_per_image.
    """

    def __init__(self, root: str | Path, split: str, *, captions_per_image: int = 5,
                 max_captions: int | None = None, load_clip: bool = False, clip_dim: int = 512) -> None:
        if captions_per_image < 1:
            raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
        if max_captions is not None and max_captions < 1:
            raise ValueError(f"max_captions must be None or >= 1, got {max_captions}")
        self.root, self.split = Path(root), split
        self.ims_path = self.root / f"{split}_ims.npy"
        self.caps_path = self.root / f"{split}_caps.txt"
        self.ids_path = self.root / f"{split}_ids.txt"
        self.clip_path = self.root / f"{split}_clip.npy"
        self.captions_per_image = captions_per_image
        require_split(self.root, split)

        self._features: np.ndarray | None = _open_npy(self.ims_path, rank=3)
        self.num_rows, self.num_regions, self.region_dim = self._features.shape
        if self.num_regions == 0 or self.region_dim == 0:  # region dropout would draw from an empty range
            raise DataError(f"{self.ims_path}: shape {self._features.shape} holds no region features (expected "
                            f"rows x regions x dim with regions and dim >= 1)")
        captions = self._read_captions()
        if self.num_rows == 0 or (len(captions) != self.num_rows and len(captions) % self.num_rows):
            raise DataError(f"{len(captions)} captions in {self.caps_path} are neither equal to nor a "
                            f"multiple of the {self.num_rows} image rows in {self.ims_path}")
        # Computed on the full file, before the cap: the cap must not change which row a caption uses.
        self.captions_per_row = 1 if len(captions) == self.num_rows else len(captions) // self.num_rows
        self.captions = captions[:max_captions]
        if len(self.captions) % captions_per_image:
            raise DataError(f"{self.caps_path}: {len(self.captions)} captions (max_captions={max_captions}) "
                            f"are not a multiple of captions_per_image={captions_per_image}")
        self.ids = self._read_ids()
        self._clip: np.ndarray | None = self._open_clip(clip_dim) if load_clip else None
        self.load_clip, self.clip_dim = load_clip, clip_dim

    def _read_captions(self) -> list[str]:
        captions = read_lines(self.caps_path)
        if not captions:
            raise DataError(f"{self.caps_path}: no captions")
        empty = next((n for n, caption in enumerate(captions, start=1) if not caption), None)
        if empty is not None:
            raise DataError(f"{self.caps_path}: line {empty} is an empty caption")
        return captions

    def _read_ids(self) -> list[str] | None:
        if not self.ids_path.is_file():
            return None
        ids = read_lines(self.ids_path)
        if len(ids) != self.num_rows:
            raise DataError(f"{self.ids_path}: {len(ids)} ids, expected one per image row of "
                            f"{self.ims_path} ({self.num_rows})")
        return ids

    def _open_clip(self, clip_dim: int) -> np.ndarray:
        if not self.clip_path.is_file():
            raise DataError(f"missing {self.clip_path} (CLIP features are required with load_clip; "
                            f"scripts/extract_clip_features.py writes them); {_expected_tree(self.root, self.split)}")
        clip = _open_npy(self.clip_path, rank=2)
        if clip.shape != (self.num_rows, clip_dim):
            raise DataError(f"{self.clip_path}: shape {clip.shape}, expected ({self.num_rows}, {clip_dim}): "
                            f"one {clip_dim}-d row per image row of {self.ims_path}")
        check_finite_rows(clip, self.clip_path)  # rows x clip_dim: small enough to check once, here
        return clip

    @property
    def features(self) -> np.ndarray:
        """The memory-mapped region features, (re)opened lazily, e.g. in a spawned DataLoader worker."""
        if self._features is None:
            self._features = _open_npy(self.ims_path, rank=3)
        return self._features

    @property
    def clip_features(self) -> np.ndarray:
        """The memory-mapped CLIP features (only with load_clip)."""
        if not self.load_clip:
            raise RuntimeError(f"{self.clip_path} was not opened: construct with load_clip=True")
        if self._clip is None:
            self._clip = _open_npy(self.clip_path, rank=2)
        return self._clip

    def __getstate__(self) -> dict:
        # Pickling a memmap would copy the whole array into the pickle: workers reopen it instead.
        return {**self.__dict__, "_features": None, "_clip": None}

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    @property
    def num_images(self) -> int:
        return self.num_captions // self.captions_per_image

    def row_of_caption(self, i: int) -> int:
        return i // self.captions_per_row

    def row_of_image(self, k: int) -> int:
        return self.row_of_caption(k * self.captions_per_image)

    def regions(self, row: int) -> np.ndarray:
        """(regions, dim) float32 copy of one row."""
        return _row_values(self.features, row, self.ims_path)

    def clip(self, row: int) -> np.ndarray:
        """(clip_dim,) float32 copy of one row (finite: checked when the split was opened)."""
        return np.array(self.clip_features[row], dtype=np.float32)


def _check_index(i: int, length: int) -> int:
    if not -length <= i < length:
        raise IndexError(f"index {i} out of range for {length} items")
    return i % length


class _PrecompBase(Dataset):
    """Shared state of the three datasets: the split reader and the caption tokenisation."""

    def __init__(self, files: PrecompSplit, tokenizer=None, max_words: int = 32) -> None:
        if tokenizer is not None and max_words < 3:
            raise ValueError(f"max_words must be >= 3 ([CLS], one word-piece, [SEP]), got {max_words}")
        self.files, self.tokenizer, self.max_words = files, tokenizer, max_words

    num_captions = property(lambda self: self.files.num_captions)
    num_images = property(lambda self: self.files.num_images)
    num_regions = property(lambda self: self.files.num_regions)
    region_dim = property(lambda self: self.files.region_dim)

    @property
    def image_ids(self) -> list[str] | None:
        """The id of each image (from S_ids.txt), or None without an ids file."""
        if self.files.ids is None:
            return None
        return [self.files.ids[self.files.row_of_image(k)] for k in range(self.num_images)]

    def _input_ids(self, i: int, corruption: float = 0.0, rng: np.random.Generator | None = None) -> torch.Tensor:
        try:
            ids = tokenize_caption(self.tokenizer, self.files.captions[i], self.max_words, corruption, rng)
        except ValueError as err:
            raise DataError(f"{self.files.caps_path}: line {i + 1}: {err}") from err
        return torch.tensor(ids, dtype=torch.long)


class PrecompDataset(_PrecompBase):
    """One item per caption with its image's regions (training and generic use).

    With train=True, VSE-infinity's augmentations: region dropout and word corruption.
    After `set_epoch(e)` their randomness is a function of (seed, epoch, caption index) alone, so a run
    resumed mid-epoch, or one with another number of DataLoader workers, sees the same augmentations;
    before it, it is drawn from torch's RNG (reproducible under a global torch.manual_seed).
    """

    def __init__(self, root: str | Path, split: str, tokenizer, *, max_words: int = 32, train: bool = False,
                 region_dropout: float = 0.2, word_corruption: float = 0.2, captions_per_image: int = 5,
                 max_captions: int | None = None, load_clip: bool = False, clip_dim: int = 512,
                 seed: int = 0) -> None:
        if not 0.0 <= region_dropout < 1.0:
            raise ValueError(f"region_dropout must lie in [0, 1), got {region_dropout}")
        if not 0.0 <= word_corruption <= 1.0:
            raise ValueError(f"word_corruption must lie in [0, 1], got {word_corruption}")
        files = PrecompSplit(root, split, captions_per_image=captions_per_image, max_captions=max_captions,
                             load_clip=load_clip, clip_dim=clip_dim)
        super().__init__(files, tokenizer, max_words)
        self.train, self.region_dropout, self.word_corruption = train, region_dropout, word_corruption
        self.seed, self.epoch = seed, None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rng(self, i: int) -> np.random.Generator:
        if self.epoch is None:
            return np.random.default_rng(torch.randint(2**31, ()).item())
        return np.random.default_rng((self.seed, self.epoch, i))

    def __len__(self) -> int:
        return self.num_captions

    def __getitem__(self, i: int) -> dict:
        i = _check_index(i, len(self))
        row = self.files.row_of_caption(i)
        regions = self.files.regions(row)
        rng, corruption = None, 0.0
        if self.train:
            rng = self._rng(i)
            regions = drop_regions(regions, self.region_dropout, rng) if self.region_dropout > 0 else regions
            corruption = self.word_corruption
        item = {"regions": torch.from_numpy(regions), "input_ids": self._input_ids(i, corruption, rng),
                "index": i, "image_index": i // self.files.captions_per_image, "row": row}
        if self.files.load_clip:
            item["clip"] = torch.from_numpy(self.files.clip(row))
        return item


class PrecompImages(_PrecompBase):
    """Evaluation: one item per image (encoded once), no augmentation."""

    def __init__(self, root: str | Path, split: str, *, captions_per_image: int = 5,
                 max_captions: int | None = None, load_clip: bool = False, clip_dim: int = 512) -> None:
        super().__init__(PrecompSplit(root, split, captions_per_image=captions_per_image,
                                      max_captions=max_captions, load_clip=load_clip, clip_dim=clip_dim))

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, k: int) -> dict:
        k = _check_index(k, len(self))
        row = self.files.row_of_image(k)
        item = {"regions": torch.from_numpy(self.files.regions(row)), "image_index": k, "row": row}
        if self.files.load_clip:
            item["clip"] = torch.from_numpy(self.files.clip(row))
        return item


class PrecompCaptions(_PrecompBase):
    """Evaluation: one item per caption, no augmentation."""

    def __init__(self, root: str | Path, split: str, tokenizer, *, max_words: int = 32,
                 captions_per_image: int = 5, max_captions: int | None = None) -> None:
        files = PrecompSplit(root, split, captions_per_image=captions_per_image, max_captions=max_captions)
        super().__init__(files, tokenizer, max_words)

    def __len__(self) -> int:
        return self.num_captions

    def __getitem__(self, i: int) -> dict:
        i = _check_index(i, len(self))
        return {"input_ids": self._input_ids(i), "index": i,
                "image_index": i // self.files.captions_per_image}
