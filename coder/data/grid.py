"""Grid features of raw images: a frozen ResNet's layer4 map, one 2048-d region per cell, in the precomp layout.

VSE-infinity (Chen et al., CVPR 2021) trains on such grids ("BUTD grid", "WSL grid"; its
lib/datasets/image_caption.py and lib/modules/resnet.py): at evaluation it resizes the whole image, without
a crop, to base_target_size 256 x input_scale_factor on both sides (train_grid.sh sets the factor to 2.0:
512 x 512), normalises with ImageNet's mean and std for ImageNet-trained backbones, and takes layer4's
16 x 16 map, 256 vectors per image. Here the backbone is frozen and the map is stored, so the tree trains
unchanged as region features (GPO pools any count); VSE-infinity instead fine-tunes the backbone.
Differences to know: PIL's bilinear resize (antialiased) stands in for OpenCV's INTER_LINEAR, and only
torchvision-layout ResNets with ImageNet normalisation are read (not the Caffe BUTD backbone, which uses BGR
pixel means).
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import MissingFileError
from .karpathy import read_karpathy
from .partial import PartialTree
from .precomp import DataError
from .resnet import GRID_DIM, build_resnet, grid_side, load_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VSE_INFTY_SIZE = 512  # 256 x input_scale_factor 2.0 (VSE-infinity's train_grid.sh)


def load_pixels(path: Path, size: int) -> torch.Tensor:
    """(3, size, size) float32, ImageNet-normalised; an unreadable file is a DataError naming it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB").resize((size, size), Image.BILINEAR)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: cannot be read as an image ({err})") from err
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (pixels - mean) / std


class _Images(Dataset):
    """Workers return an error message instead of raising, so a bad file stays a one-line error."""

    def __init__(self, items: list[tuple[str, int, Path]], size: int):
        self.items, self.size = items, size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        split, row, path = self.items[i]
        try:
            return split, row, load_pixels(path, self.size), ""
        except DataError as err:
            return split, row, torch.zeros(3, self.size, self.size), str(err)


def _collate(batch):
    splits, rows, pixels, errors = zip(*batch)
    return list(splits), list(rows), torch.stack(pixels), list(errors)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def extract_grid_features(images: str | Path, karpathy: str | Path, out: str | Path, *, weights: str | Path | None,
                          arch: str = "resnet152", size: int = VSE_INFTY_SIZE, splits: tuple[str, ...] | None = None,
                          dataset: str = "auto", id_field: str = "auto", batch_size: int = 32, num_workers: int = 4,
                          device: str = "auto", seed: int = 0, progress: bool = True) -> dict:
    """Write S_ims.npy (images, side^2, 2048) with S_caps.txt / S_ids.txt for the Karpathy splits into `out`;
    `weights` None means a random initialisation from `seed` (tests only). Resumes an interrupted run."""
    from tqdm import tqdm

    images, karpathy = Path(images), Path(karpathy)
    dataset, all_splits = read_karpathy(karpathy, dataset, id_field)
    if splits:
        unknown = [s for s in splits if s not in all_splits]
        if unknown:
            raise DataError(f"{karpathy}: no {unknown[0]!r} split (it has {sorted(all_splits)})")
        all_splits = {s: all_splits[s] for s in splits}
    for split, ims in all_splits.items():  # every image exists before a long run starts
        missing = [im for im in ims if not (images / im.path).is_file()]
        if missing:
            raise MissingFileError(f"{images / missing[0].path}: image of id {missing[0].image_id} ({split}) not "
                                   f"found; {len(missing)} of the {len(ims)} {split} images are missing under {images}")
    side = grid_side(size)
    torch.manual_seed(seed)
    model = build_resnet(arch)
    source = "random-init seed %d" % seed
    if weights is not None:
        load_weights(model, weights)
        source = f"{Path(weights).name} ({Path(weights).stat().st_size} bytes)"
    dev = pick_device(device)
    model = model.to(dev).eval()
    ids = hashlib.sha1("\n".join(f"{s}:{im.image_id}:{im.path}" for s, ims in all_splits.items() for im in ims)
                       .encode()).hexdigest()
    tree = PartialTree(out, {s: (len(ims), side * side, GRID_DIM) for s, ims in all_splits.items()},
                       {"karpathy": [karpathy.name, ids], "arch": arch, "size": size, "weights": source}, "grid")
    todo = [(s, row, images / im.path) for s, ims in all_splits.items() for row, im in enumerate(ims)
            if not tree.done[s][row]]
    loader = DataLoader(_Images(todo, size), batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
                        pin_memory=dev.type == "cuda", persistent_workers=False)
    started = time.perf_counter()
    with torch.inference_mode(), tqdm(total=tree.rows_done + len(todo), initial=tree.rows_done, unit="img",
                                      desc=f"{arch} grid", disable=not progress, dynamic_ncols=True) as bar:
        for split_names, rows, pixels, errors in loader:
            bad = next((e for e in errors if e), None)
            if bad:
                raise DataError(bad)
            grid = model.grid(pixels.to(dev, non_blocking=True))  # (batch, 2048, side, side)
            features = grid.flatten(2).transpose(1, 2).float().cpu().numpy()  # (batch, side^2, 2048), row-major cells
            finite = np.isfinite(features).reshape(len(rows), -1).all(axis=1)
            if not finite.all():
                k = int(np.argmin(finite))
                raise DataError(f"{images / all_splits[split_names[k]][rows[k]].path}: non-finite features from "
                                f"{arch} (weights {source})")
            for split, row, feats in zip(split_names, rows, features):
                tree.arrays[split][row] = feats
                tree.done[split][row] = True
            tree.checkpoint({})
            bar.update(len(rows))
    tree.finish(all_splits, str(karpathy))
    seconds = time.perf_counter() - started
    return {"dataset": dataset, "rows": len(todo), "seconds": seconds, "device": str(dev),
            "splits": {s: len(ims) for s, ims in all_splits.items()}, "regions": side * side}
