"""Extract frozen global CLIP image embeddings for USER's CLIP-guided enhancement (CGE).

For each split S, reads the image ids of `S_ids.txt` (one per image row), looks each id up in a mapping
file (TSV `id<TAB>relative/path.jpg` or JSON `{"id": "relative/path.jpg"}`), encodes the images with
`transformers.CLIPModel` loaded from a local directory, and writes `S_clip.npy` (rows, projection_dim)
float32, row i = image of line i of `S_ids.txt`. The stored vectors are CLIP's projected image embeddings
(before L2 normalisation).

Resumable: rows are written into `S_clip.npy.partial` (a .npy memmap) and `S_clip.npy.progress.json`
records the rows finished; a rerun continues after the last finished batch, and the partial file is
renamed to `S_clip.npy` when complete.

    python scripts/extract_clip_features.py --model-dir models/clip-vit-base-patch32 \
        --mapping data/f30k_images.tsv --image-root data/flickr30k-images \
        --data-root data/f30k_precomp --splits train dev test
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download at run time (README)

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from coder.errors import CoderError, MissingFileError

CLIP_NAME = "openai/clip-vit-base-patch32"


class ClipInputError(CoderError, ValueError):
    """A mapping, id list or image that cannot be used; the message names the file and entry."""


def download_hint(model_dir: Path) -> str:
    return (f"download {CLIP_NAME} once on a machine with network access and save it locally: "
            f"python -c \"from transformers import CLIPModel, CLIPImageProcessor as P; "
            f"CLIPModel.from_pretrained('{CLIP_NAME}').save_pretrained('{model_dir}'); "
            f"P.from_pretrained('{CLIP_NAME}').save_pretrained('{model_dir}')\", "
            f"then copy '{model_dir}' here (or pass --model-dir).")


def read_mapping(path: str | os.PathLike) -> dict[str, str]:
    """Image id -> relative image path, from a TSV (`id<TAB>path` per line) or a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"image mapping file not found: {path}")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ClipInputError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(data, dict) or not all(isinstance(p, str) for p in data.values()):
            raise ClipInputError(f"{path}: expected a JSON object {{\"image id\": \"relative/path.jpg\"}}")
        return {str(k): p for k, p in data.items()}
    mapping: dict[str, str] = {}
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
                raise ClipInputError(f"{path}:{line_no}: expected 'id<TAB>relative/path', got {line!r}")
            image_id, image_path = fields[0].strip(), fields[1].strip()
            if mapping.get(image_id, image_path) != image_path:
                raise ClipInputError(f"{path}:{line_no}: id {image_id!r} maps to two paths "
                                     f"({mapping[image_id]!r} and {image_path!r})")
            mapping[image_id] = image_path
    return mapping


def read_ids(path: str | os.PathLike) -> list[str]:
    """One image id per line of `S_ids.txt` (row order of the split)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"image id list not found: {path}")
    ids = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    for line_no, image_id in enumerate(ids, start=1):
        if not image_id:
            raise ClipInputError(f"{path}:{line_no}: empty image id")
    if not ids:
        raise ClipInputError(f"{path}: no image ids")
    return ids


def resolve_image_paths(ids: list[str], mapping: dict[str, str], image_root: str | os.PathLike,
                        ids_path: str | os.PathLike = "S_ids.txt",
                        mapping_path: str | os.PathLike = "mapping") -> list[Path]:
    """Image file of every id, checked up front so a long run does not fail halfway."""
    root = Path(image_root)
    paths = []
    for line_no, image_id in enumerate(ids, start=1):
        if image_id not in mapping:
            raise ClipInputError(f"{ids_path}:{line_no}: image id {image_id!r} is missing from {mapping_path}")
        path = root / mapping[image_id]
        if not path.is_file():
            raise MissingFileError(f"image file for id {image_id!r} ({ids_path}:{line_no}) not found: {path}")
        paths.append(path)
    return paths


def load_image(path: Path, image_id: str) -> Image.Image:
    """Decoded RGB image; an unreadable file is an error naming the id and path."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:  # incl. UnidentifiedImageError
        raise ClipInputError(f"cannot read image for id {image_id!r}: {path} ({exc})") from exc


def load_clip(model_dir: str | os.PathLike, device: str | torch.device = "cpu"):
    """(CLIPModel in eval mode on `device`, image processor), both from a local directory only."""
    from transformers import AutoImageProcessor, CLIPModel

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise MissingFileError(f"no CLIP model found at {model_dir} (expected {model_dir / 'config.json'}); "
                                + download_hint(model_dir))
    if not (model_dir / "preprocessor_config.json").is_file():
        raise MissingFileError(f"no CLIP image processor at {model_dir} "
                                f"(expected {model_dir / 'preprocessor_config.json'}); " + download_hint(model_dir))
    model = CLIPModel.from_pretrained(model_dir, local_files_only=True).to(device).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
    return model, processor


@torch.inference_mode()
def encode_images(model, processor, images: list[Image.Image]) -> np.ndarray:
    """CLIP projected image embeddings (n, projection_dim) float32."""
    device = next(model.parameters()).device
    pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device)
    pooled = model.vision_model(pixel_values=pixels).pooler_output
    return model.visual_projection(pooled).float().cpu().numpy()


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)


def _progress_identity(ids: list[str], dim: int) -> dict:
    digest = hashlib.sha1("\n".join(ids).encode("utf-8")).hexdigest()
    return {"rows": len(ids), "dim": dim, "ids_sha1": digest}


def extract_split(model, processor, ids_path: str | os.PathLike, mapping_path: str | os.PathLike,
                  image_root: str | os.PathLike, output_path: str | os.PathLike | None = None,
                  batch_size: int = 64, num_workers: int = 4) -> Path:
    """Writes `S_clip.npy` aligned with `S_ids.txt` (default: next to it); resumes an interrupted run."""
    ids_path = Path(ids_path)
    if output_path is None:
        stem = ids_path.name[:-len("_ids.txt")] if ids_path.name.endswith("_ids.txt") else ids_path.stem
        output_path = ids_path.with_name(f"{stem}_clip.npy")
    output_path = Path(output_path)
    ids = read_ids(ids_path)
    paths = resolve_image_paths(ids, read_mapping(mapping_path), image_root, ids_path, mapping_path)

    dim = int(model.config.projection_dim)
    partial = output_path.with_name(output_path.name + ".partial")
    progress_path = output_path.with_name(output_path.name + ".progress.json")
    if output_path.is_file() and not partial.exists():
        if np.load(output_path, mmap_mode="r").shape == (len(ids), dim):
            progress_path.unlink(missing_ok=True)
            return output_path  # finished by an earlier run
        raise ClipInputError(f"{output_path} exists with a shape other than ({len(ids)}, {dim}); "
                             "delete it to extract again")
    identity = _progress_identity(ids, dim)
    done = 0
    if partial.is_file() and progress_path.is_file():
        progress = json.loads(progress_path.read_text(encoding="utf-8"))
        differs = [k for k in identity if progress.get(k) != identity[k]]
        if differs:
            raise ClipInputError(f"{progress_path} belongs to another run (differs in {differs}); "
                                 f"delete it and {partial} to start over")
        done = int(progress["done"])
        features = np.lib.format.open_memmap(partial, mode="r+")
    else:
        features = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(len(ids), dim))
        _write_json_atomic(progress_path, {**identity, "done": 0})

    pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else None
    try:
        with tqdm(total=len(ids), initial=done, desc=f"CLIP {ids_path.name}", unit="img") as bar:
            for start in range(done, len(ids), batch_size):
                stop = min(start + batch_size, len(ids))
                args = (paths[start:stop], ids[start:stop])
                images = list(pool.map(load_image, *args) if pool else map(load_image, *args))
                features[start:stop] = encode_images(model, processor, images)
                features.flush()  # rows on disk before the progress file claims them
                _write_json_atomic(progress_path, {**identity, "done": stop})
                bar.update(stop - start)
    finally:
        if pool is not None:
            pool.shutdown()
    del features
    os.replace(partial, output_path)
    progress_path.unlink()
    return output_path


def extract_clip_features(model_dir: str | os.PathLike, ids_path: str | os.PathLike,
                          mapping_path: str | os.PathLike, image_root: str | os.PathLike,
                          output_path: str | os.PathLike | None = None, batch_size: int = 64,
                          num_workers: int = 4, device: str = "cpu") -> Path:
    """Loads CLIP from `model_dir` and extracts one split (see `extract_split`)."""
    model, processor = load_clip(model_dir, device)
    return extract_split(model, processor, ids_path, mapping_path, image_root, output_path, batch_size, num_workers)


def main(argv: list[str] | None = None) -> int:
    """The command line: a problem with the inputs is one `error: ...` line and exit status 2."""
    try:
        run(argv)
    except CoderError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default="models/clip-vit-base-patch32",
                        help=f"local directory holding {CLIP_NAME} (save_pretrained of model and processor)")
    parser.add_argument("--mapping", required=True, help="id -> image path file (.tsv or .json)")
    parser.add_argument("--image-root", required=True, help="folder the mapping's paths are relative to")
    parser.add_argument("--data-root", help="precomp folder holding S_ids.txt; S_clip.npy is written there")
    parser.add_argument("--splits", nargs="+", default=["train", "dev", "test"])
    parser.add_argument("--ids", help="a single S_ids.txt (instead of --data-root/--splits)")
    parser.add_argument("--output", help="output .npy for --ids (default: S_clip.npy next to it)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=4, help="image decoding threads (0: none)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if (args.ids is None) == (args.data_root is None):
        parser.error("give exactly one of --ids or --data-root")

    jobs = ([(Path(args.ids), args.output)] if args.ids
            else [(Path(args.data_root) / f"{s}_ids.txt", None) for s in args.splits])
    mapping = read_mapping(args.mapping)
    for ids_path, _ in jobs:  # fail on a bad id or missing image before any long extraction starts
        resolve_image_paths(read_ids(ids_path), mapping, args.image_root, ids_path, args.mapping)
    model, processor = load_clip(args.model_dir, args.device)
    for ids_path, output in jobs:
        out = extract_split(model, processor, ids_path, args.mapping, args.image_root, output,
                            args.batch_size, args.num_workers)
        print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
