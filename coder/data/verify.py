"""Check a downloaded or converted precomp tree before training on it: `scripts/check_data.py` prints the report.

Every split is opened by `PrecompSplit`, the reader training uses, so a tree that passes here passes training's
own checks (files, dtype, rank, region count, caption-to-row alignment, ids). On top of those, this module checks
what training cannot know or would only find mid-epoch: the image counts of the named data set (Karpathy's
splits as released with SCAN's precomp features), non-finite values in a sample of rows (or every row), ids
that do not stay constant over an image's caption rows, and ids shared by the training split and an
evaluation split. Every problem is one line naming the file at fault.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .precomp import DataError, PrecompSplit, _open_npy, check_finite_rows

CAPTIONS_PER_IMAGE = 5

# Karpathy's splits of Flickr30K and MSCOCO in the precomp layout of SCAN (Lee et al., ECCV 2018), which
# VSE-infinity, CVSE, USER and CODER (§4.1: 29,000 / 1,014 / 1,000 Flickr30K images; MSCOCO 113,287 training
# images with restval, 5,000 for validation and 5,000 for testing) all use. `required` are the splits a run
# reads (train, the validation split, the test split of configs/f30k_*.yaml and configs/coco_*.yaml).
KNOWN = {
    "f30k": {"name": "Flickr30K", "images": {"train": 29_000, "dev": 1_014, "test": 1_000},
             "required": ("train", "dev", "test")},
    "coco": {"name": "MSCOCO", "images": {"train": 113_287, "dev": 5_000, "testall": 5_000},
             "required": ("train", "dev", "testall")},
}
EVAL_SPLITS = ("test", "testall")  # with --dataset any: at least one of them


@dataclass
class SplitSummary:
    split: str
    images: int
    captions: int
    rows: int
    regions: int
    dim: int
    nbytes: int
    note: str = ""


@dataclass
class TreeReport:
    root: Path
    dataset: str
    splits: list[SplitSummary] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    finite: str = ""

    @property
    def ok(self) -> bool:
        return not self.errors

    def format(self) -> str:
        name = KNOWN[self.dataset]["name"] if self.dataset in KNOWN else "any data set (no known sizes)"
        lines = [f"check_data: {self.root} as {name}",
                 f"{'split':<9}{'images':>10}{'captions':>10}{'rows':>10}  {'regions x dim':<15}{'size':>9}"]
        for s in self.splits:
            shape = f"{s.regions} x {s.dim}"
            lines.append(f"{s.split:<9}{s.images:>10,}{s.captions:>10,}{s.rows:>10,}  {shape:<15}"
                         f"{_size(s.nbytes):>9}  {s.note}".rstrip())
        if self.finite:
            lines.append(self.finite)
        lines += [f"warning: {w}" for w in self.warnings] + [f"error: {e}" for e in self.errors]
        names = ", ".join(s.split for s in self.splits)
        lines.append(f"OK: the tree will train ({names})" if self.ok else
                     f"FAILED: {len(self.errors)} problem(s); the tree will not train as it is")
        return "\n".join(lines)


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def sample_rows(num_rows: int, sample: int | None) -> np.ndarray:
    """Row indices to read for the finite check: all rows (sample None or >= rows), else `sample` rows evenly
    spaced from the first to the last."""
    if sample is None or sample >= num_rows:
        return np.arange(num_rows)
    return np.unique(np.linspace(0, num_rows - 1, max(2, sample)).round().astype(np.int64))


def check_finite_sample(files: PrecompSplit, sample: int | None) -> int:
    """Non-finite values in the sampled rows of `files`' features raise a DataError naming file and row.
    Returns how many rows were read."""
    if sample is None:
        check_finite_rows(files.features, files.ims_path)
        return files.num_rows
    rows = sample_rows(files.num_rows, sample)
    for row in rows:
        files.regions(int(row))  # training's own per-row check: a DataError naming file and row
    return len(rows)


def zero_rows(files: PrecompSplit, sample: int | None) -> list[int]:
    """All-zero rows among the sampled ones (a warning: a detector may leave an image empty); with --full too,
    only a sample is looked at (512 rows), since the finite check has already read every row."""
    rows = sample_rows(files.num_rows, sample or 512)
    return [int(r) for r in rows if not np.any(files.features[int(r)])]


def check_ids(files: PrecompSplit) -> None:
    """With one row per caption, an image's caption rows must carry one id (a shifted captions or ids file
    breaks this) -- checked when the file repeats ids at all: ids unique per row label rows, not images, and
    say nothing about alignment. With one row per image, no id may appear twice."""
    ids = files.ids
    if ids is None:
        return
    if files.captions_per_row == 1 and files.num_rows != files.num_images:
        if len(set(ids)) == len(ids):
            return
        cpi = files.captions_per_image
        for k in range(files.num_rows // cpi):
            group = ids[k * cpi:(k + 1) * cpi]
            if len(set(group)) > 1:
                raise DataError(f"{files.ids_path}: lines {k * cpi + 1}-{(k + 1) * cpi} (the caption rows of image "
                                f"{k}) hold different ids {sorted(set(group))}: rows and captions are misaligned")
        return
    seen: dict[str, int] = {}
    for line, image_id in enumerate(ids, start=1):
        if image_id in seen:
            raise DataError(f"{files.ids_path}: id {image_id} on lines {seen[image_id]} and {line}: two rows of one "
                            f"image")
        seen[image_id] = line


def check_count(files: PrecompSplit, dataset: str) -> None:
    expected = KNOWN.get(dataset, {}).get("images", {}).get(files.split)
    if expected is not None and files.num_images != expected:
        raise DataError(f"{files.ims_path}: {files.num_images:,} images ({files.num_rows:,} rows, "
                        f"{files.num_captions:,} captions in {files.caps_path.name}); {KNOWN[dataset]['name']}'s "
                        f"{files.split} split has {expected:,}")


def required_splits(root: Path, dataset: str) -> tuple[str, ...]:
    if dataset in KNOWN:
        return KNOWN[dataset]["required"]
    present = tuple(s for s in EVAL_SPLITS if (root / f"{s}_ims.npy").is_file() or (root / f"{s}_caps.txt").is_file())
    return ("train", "dev") + (present or ("test",))


def verify_tree(root: str | Path, dataset: str = "any", splits: tuple[str, ...] | None = None,
                sample: int | None = 512) -> TreeReport:
    """Check every split a run reads (`splits`, by default those of `dataset`); `sample` rows per split are
    read for the finite check (None: every row, in chunks)."""
    root = Path(root)
    if dataset not in (*KNOWN, "any"):
        raise ValueError(f"dataset must be one of {sorted(KNOWN)} or 'any', got {dataset!r}")
    report = TreeReport(root, dataset)
    if not root.is_dir():
        report.errors.append(f"{root}: no such folder")
        return report
    names = splits or required_splits(root, dataset)
    optional = [s for s in ("test", "testall") if s not in names and (root / f"{s}_ims.npy").is_file()]
    opened: dict[str, PrecompSplit] = {}
    read = 0
    for split in (*names, *optional):
        try:  # training's reader: a split it refuses gets no further checks
            files = PrecompSplit(root, split, captions_per_image=CAPTIONS_PER_IMAGE)
        except DataError as err:
            report.errors.append(str(err))
            continue
        note = "one row per caption" if files.captions_per_row == 1 and files.num_rows != files.num_images else ""
        report.splits.append(SplitSummary(split, files.num_images, files.num_captions, files.num_rows,
                                          files.num_regions, files.region_dim, files.features.nbytes, note))
        opened[split] = files
        for check in (lambda: check_count(files, dataset), lambda: check_ids(files), lambda: _check_clip(files)):
            try:
                check()
            except DataError as err:
                report.errors.append(str(err))
        try:
            read += check_finite_sample(files, sample)
        except DataError as err:
            report.errors.append(str(err))
        zeros = zero_rows(files, sample)
        if zeros:
            report.warnings.append(f"{files.ims_path}: {len(zeros)} sampled row(s) are all zero (first: row "
                                   f"{zeros[0]}): an image the detector or converter left empty?")
    report.finite = (f"finite values: every row read ({read:,} rows)" if sample is None else
                     f"finite values: {read:,} rows read (up to {sample} per split, evenly spaced; --full reads all)")
    _check_leaks(opened, report)
    return report


def _check_clip(files: PrecompSplit) -> None:
    """USER's CGE features, when present: training's own check (shape and every value finite)."""
    if files.clip_path.is_file():
        clip_dim = _open_npy(files.clip_path, rank=2).shape[1]
        PrecompSplit(files.root, files.split, captions_per_image=CAPTIONS_PER_IMAGE, load_clip=True, clip_dim=clip_dim)


def _check_leaks(opened: dict[str, PrecompSplit], report: TreeReport) -> None:
    """An image id of the training split that is also in an evaluation split is a leak."""
    train = opened.get("train")
    if train is None or train.ids is None:
        return
    train_ids = set(train.ids)
    for split, files in opened.items():
        if split == "train" or files.ids is None:
            continue
        shared = sorted(train_ids.intersection(files.ids))
        if shared:
            report.errors.append(f"{files.ids_path}: {len(shared)} id(s) also in {train.ids_path.name} (first: "
                                 f"{shared[0]}): evaluation images in the training split")
