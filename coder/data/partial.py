"""A precomp tree being written by a converter: resumable, and never mistaken for a finished one.

Each split's features go into `S_ims.npy.partial`, a preallocated .npy memory map (`np.lib.format.open_memmap`),
so the output never has to fit in memory. Which rows are written is kept in `.NAME_done.npz` and where the
converter stands in its input in `.NAME_progress.json`; both are replaced atomically after the rows they claim
are flushed, so a run killed at any point resumes from its last checkpoint and redoes at most the rows after
it. `finish` checks every row was written, renames the arrays to `S_ims.npy` and writes captions and ids.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from .karpathy import KarpathyImage, write_text_files
from .precomp import DataError


def _replace_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class PartialTree:
    def __init__(self, out: str | Path, shapes: dict[str, tuple[int, int, int]], identity: dict, name: str):
        self.out, self.name = Path(out), name
        self.out.mkdir(parents=True, exist_ok=True)
        self.progress_path = self.out / f".{name}_progress.json"
        self.done_path = self.out / f".{name}_done.npz"
        identity = json.loads(json.dumps({**identity, "shapes": {s: list(v) for s, v in shapes.items()}}))
        self.arrays: dict[str, np.ndarray] = {}
        self.position: dict = {}
        if self.progress_path.is_file():
            progress = json.loads(self.progress_path.read_text(encoding="utf-8"))
            differs = sorted(k for k in set(identity) | set(progress["identity"])
                             if progress["identity"].get(k) != identity.get(k))
            if differs:
                raise DataError(f"{self.progress_path}: an unfinished conversion with other inputs or settings "
                                f"(differs in {', '.join(differs)}); delete it, {self.done_path.name} and the "
                                f"*.partial files in {self.out} to start over")
            with np.load(self.done_path) as done:
                self.done = {s: done[s].copy() for s in shapes}
            self.arrays = {s: np.lib.format.open_memmap(self.partial(s), mode="r+") for s in shapes}
            self.position = progress["position"]
        else:
            for split in shapes:
                if (self.out / f"{split}_ims.npy").exists():
                    raise DataError(f"{self.out / f'{split}_ims.npy'} exists: write into an empty folder, or delete it")
            self.arrays = {s: np.lib.format.open_memmap(self.partial(s), mode="w+", dtype=np.float32, shape=shape)
                           for s, shape in shapes.items()}
            self.done = {s: np.zeros(shape[0], dtype=bool) for s, shape in shapes.items()}
        self.identity = identity
        if not self.progress_path.is_file():
            self.checkpoint({})

    def partial(self, split: str) -> Path:
        return self.out / f"{split}_ims.npy.partial"

    @property
    def rows_done(self) -> int:
        return int(sum(d.sum() for d in self.done.values()))

    def checkpoint(self, position: dict) -> None:
        """Rows to disk first, then the record of them, then where the input stands."""
        for array in self.arrays.values():
            array.flush()
        buffer = io.BytesIO()
        np.savez(buffer, **self.done)
        _replace_bytes(self.done_path, buffer.getvalue())
        self.position = position
        _replace_bytes(self.progress_path, json.dumps({"identity": self.identity, "position": position}).encode())

    def finish(self, images: dict[str, list[KarpathyImage]], source: str) -> None:
        """Every row written, or a DataError naming the first image no input row covered."""
        for split, done in self.done.items():
            if not done.all():
                first = int(np.argmin(done))
                raise DataError(f"{source}: {int((~done).sum())} of the {len(done)} {split} images have no features "
                                f"(first: id {images[split][first].image_id}); the conversion is kept in {self.out} "
                                f"(*.partial) for a rerun with the missing input")
        self.checkpoint(self.position)
        for split in self.done:
            self.arrays[split].flush()
        self.arrays.clear()
        for split in self.done:
            write_text_files(self.out, split, images[split])
            os.replace(self.partial(split), self.out / f"{split}_ims.npy")
        self.progress_path.unlink()
        self.done_path.unlink()
