"""The bottom-up-attention detector's TSV (Anderson et al., CVPR 2018; its tools/generate_tsv.py) to precomp.

Each TSV line is `image_id, image_w, image_h, num_boxes, boxes, features`, tab-separated, the last two base64
of float32 arrays (num_boxes x 4 and num_boxes x dim): the format SCAN's README names for its own
util/convert_data.py. That script holds a whole split in memory; here rows stream into preallocated memory
maps (COCO's train split is 33 GB) and the position in the TSV is checkpointed, so a killed run resumes.
Lines are split by hand rather than with the csv module, whose default field size limit (128 KB) is far
below a row's base64 features (about 390 KB for 36 x 2048), and which cannot resume from a byte offset.

Every row is checked: field count, numbers, box count, decoded sizes, finite values; an image id of the
Karpathy file seen twice is an error, ids not in it are skipped (a TSV may cover more images), and an
image with no row is an error when the TSV ends.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import time
from pathlib import Path

import numpy as np

from .karpathy import KarpathyImage, read_karpathy
from .partial import PartialTree
from .precomp import DataError

FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")


def decode_floats(field: bytes, count: int, what: str, where: str) -> np.ndarray:
    """A base64 float32 array of `count` values. Tolerates the `b'...'` wrapper that Python 3 ports of
    generate_tsv.py write when they print bytes with str()."""
    if field.startswith(b"b'") and field.endswith(b"'"):
        field = field[2:-1]
    try:
        raw = base64.b64decode(field, validate=True)
    except (binascii.Error, ValueError) as err:
        raise DataError(f"{where}: {what} is not valid base64 ({err})") from err
    if len(raw) != 4 * count:
        raise DataError(f"{where}: {what} decode to {len(raw) // 4} float32 values, expected {count}")
    values = np.frombuffer(raw, dtype=np.float32)
    if not np.isfinite(values).all():
        raise DataError(f"{where}: {what} hold non-finite values (NaN or inf)")
    return values


def parse_row(line: bytes, boxes: int, dim: int, where: str) -> tuple[str, np.ndarray]:
    """(image id, (boxes, dim) features) of one TSV line, every field checked."""
    fields = line.rstrip(b"\r\n").split(b"\t")
    if len(fields) != len(FIELDS):
        raise DataError(f"{where}: {len(fields)} tab-separated fields, expected {len(FIELDS)} ({', '.join(FIELDS)})")
    try:
        image_id = fields[0].decode("ascii").strip()
        width, height, num_boxes = (int(f) for f in fields[1:4])
    except (UnicodeDecodeError, ValueError) as err:
        raise DataError(f"{where}: image_id / image_w / image_h / num_boxes are not integers ({err})") from err
    where = f"{where} (image id {image_id})"
    if width <= 0 or height <= 0:
        raise DataError(f"{where}: image size {width} x {height}")
    if num_boxes != boxes:
        raise DataError(f"{where}: {num_boxes} boxes, expected {boxes} (--boxes): the precomp layout needs one box "
                        f"count for every image (generate_tsv.py's fixed-36 setting)")
    decode_floats(fields[4], num_boxes * 4, "boxes", where)
    features = decode_floats(fields[5], num_boxes * dim, "features", where)
    return image_id, features.reshape(num_boxes, dim)


def _identity(tsv_paths: list[Path], karpathy: Path, splits: dict[str, list[KarpathyImage]], boxes: int,
              dim: int) -> dict:
    ids = hashlib.sha1("\n".join(f"{s}:{im.image_id}" for s, ims in splits.items() for im in ims).encode())
    return {"tsv": [[p.name, p.stat().st_size] for p in tsv_paths], "karpathy": [karpathy.name, ids.hexdigest()],
            "boxes": boxes, "dim": dim}


def convert_butd_tsv(tsv_paths: list[str | Path], karpathy: str | Path, out: str | Path, *, dataset: str = "auto",
                     id_field: str = "auto", boxes: int = 36, dim: int = 2048, checkpoint_rows: int = 2000,
                     progress: bool = True) -> dict:
    """Write S_ims.npy / S_caps.txt / S_ids.txt of every Karpathy split into `out`; resumes an interrupted run
    with the same inputs. Returns counts and timing (rows converted in this call, rows skipped, seconds)."""
    from tqdm import tqdm

    tsv_paths, karpathy = [Path(p) for p in tsv_paths], Path(karpathy)
    for path in tsv_paths:
        if not path.is_file():
            raise DataError(f"{path}: TSV file not found")
    dataset, splits = read_karpathy(karpathy, dataset, id_field)
    where_is = {im.image_id: (split, row) for split, ims in splits.items() for row, im in enumerate(ims)}
    tree = PartialTree(out, {s: (len(ims), boxes, dim) for s, ims in splits.items()},
                       _identity(tsv_paths, karpathy, splits, boxes, dim), "butd")
    file_index, offset, line_no = (tree.position.get(k, 0) for k in ("file", "offset", "line"))
    converted = skipped = since = 0
    total = sum(p.stat().st_size for p in tsv_paths)
    start_bytes = sum(p.stat().st_size for p in tsv_paths[:file_index]) + offset
    started = time.perf_counter()
    with tqdm(total=total, initial=start_bytes, unit="B", unit_scale=True, desc="BUTD TSV", disable=not progress,
              dynamic_ncols=True) as bar:
        for index in range(file_index, len(tsv_paths)):
            path = tsv_paths[index]
            if index != file_index:
                offset = line_no = 0
            with path.open("rb") as f:
                f.seek(offset)
                for line in f:
                    line_no += 1
                    offset += len(line)
                    bar.update(len(line))
                    if not line.strip():
                        continue
                    image_id, features = parse_row(line, boxes, dim, f"{path}:{line_no}")
                    if image_id not in where_is:
                        skipped += 1
                        continue
                    split, row = where_is[image_id]
                    if tree.done[split][row]:
                        raise DataError(f"{path}:{line_no}: image id {image_id} has a second row (its {split} "
                                        f"features were already written)")
                    tree.arrays[split][row] = features
                    tree.done[split][row] = True
                    converted += 1
                    since += 1
                    if since >= checkpoint_rows:
                        tree.checkpoint({"file": index, "offset": offset, "line": line_no})
                        since = 0
            tree.checkpoint({"file": index + 1, "offset": 0, "line": 0})
    tree.finish(splits, ", ".join(str(p) for p in tsv_paths))
    return {"dataset": dataset, "rows": converted, "skipped": skipped, "seconds": time.perf_counter() - started,
            "splits": {s: len(ims) for s, ims in splits.items()}}


def encode_row(image_id: str | int, width: int, height: int, boxes: np.ndarray, features: np.ndarray) -> bytes:
    """One TSV line in the detector's format (for tests, benchmarks and tools that write such files)."""
    def b64(a: np.ndarray) -> bytes:
        return base64.b64encode(np.ascontiguousarray(a, dtype=np.float32).tobytes())
    head = f"{image_id}\t{width}\t{height}\t{len(features)}\t".encode()
    return head + b64(boxes) + b"\t" + b64(features) + b"\n"
