"""How many DataLoader workers, and how they are set up, for the device a run trains on."""
from __future__ import annotations

import os

# more workers than this only add start-up time and memory: at batch 128 a worker builds a batch (36 x 2,048
# regions x 128 from the memory map, 128 captions tokenised) in a few tens of ms (benchmarks/RESULTS.md)
MAX_AUTO_WORKERS = 8


def cpus_per_process() -> int:
    """The CPUs this process may run on (its affinity, e.g. a Slurm or container limit), shared by the
    processes torchrun started on this machine."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def resolve_num_workers(num_workers: int | str, device_type: str) -> int:
    """`data.num_workers`: an int as given; "auto" = 0 on the CPU (the step itself uses every core, and
    workers would only compete with it) and on CUDA one CPU per process left to the main process, the rest
    (at most MAX_AUTO_WORKERS) loading batches while the GPU computes."""
    if num_workers != "auto":
        return int(num_workers)
    if device_type != "cuda":
        return 0
    return max(1, min(MAX_AUTO_WORKERS, cpus_per_process() - 1))


def loader_options(num_workers: int | str, device_type: str) -> dict:
    """DataLoader keywords: workers, and page-locked batches on CUDA (so the host-to-device copy can overlap
    with compute). Workers are not persistent: they would keep the dataset as it was when they started, so
    `PrecompDataset.set_epoch` would not reach them and every epoch would repeat epoch 0's augmentation."""
    workers = resolve_num_workers(num_workers, device_type)
    if workers > 0:
        # workers fork from a process whose fast tokenizer may have used its thread pool (evaluation, the
        # demo): without this, HF tokenizers warn and disable it in each child, or could deadlock
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return {"num_workers": workers, "pin_memory": device_type == "cuda", "persistent_workers": False}
