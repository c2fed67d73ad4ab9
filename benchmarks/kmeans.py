#!/usr/bin/env python
"""Time coder.clustering.spherical_kmeans (CODER §3.4) and append the numbers to benchmarks/RESULTS.md.

    python benchmarks/kmeans.py                  # CPU: 14,500 x 1,024 -> 1,000 and 29,000 x 1,024 -> 2,000
    python benchmarks/kmeans.py --device cuda    # adds the full F30K size 145,000 x 1,024 -> 10,000

Points are synthetic unit vectors around planted directions (like L2norm(v^I + w^I) of related pairs),
so clusters exist and the iterations do real work. The iterations actually run (k-means stops early
once no label changes) are reported next to each time.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from coder.clustering import spherical_kmeans

CPU_SIZES = [(14_500, 1_000), (29_000, 2_000)]
FULL_SIZE = (145_000, 10_000)


def synthetic(n: int, dim: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    directions = F.normalize(torch.randn(max(n // 15, 1), dim, generator=g), dim=1)
    x = directions[torch.randint(0, directions.shape[0], (n,), generator=g)] + 0.05 * torch.randn(n, dim, generator=g)
    return F.normalize(x, dim=1).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--chunk-size", type=int, default=65536)
    parser.add_argument("--no-write", action="store_true", help="print only, do not append to RESULTS.md")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    device = torch.device(args.device)
    sizes = CPU_SIZES + ([FULL_SIZE] if device.type == "cuda" else [])

    rows = []
    for n, k in sizes:
        x = synthetic(n, args.dim, device)
        spherical_kmeans(x[:2048], 64, iters=1, chunk_size=args.chunk_size)  # warm-up (kernels, threads)
        sync(device)
        start = time.perf_counter()
        result = spherical_kmeans(x, k, iters=args.iters, chunk_size=args.chunk_size, seed=0)
        sync(device)
        seconds = time.perf_counter() - start
        steps = len(result.inertia)  # assignments run: iterations + the initial one
        work = n * k * args.dim * steps / 1e9  # multiply-adds of the assignment matmuls
        rows.append((n, k, steps - 1, seconds, work / seconds, int((result.sizes == 0).sum())))
        print(f"N={n:>7,} k={k:>6,} iters={steps - 1:>2}: {seconds:7.2f} s  "
              f"({work / seconds:6.1f} G mult-add/s, empty clusters {rows[-1][5]})", flush=True)
    if len(rows) > 1:
        (n0, k0, _, t0, _, _), (n1, k1, _, t1, _, _) = rows[0], rows[1]
        print(f"time x{t1 / t0:.2f} for N*k x{n1 * k1 / (n0 * k0):.1f} (cost grows with N*k*F)")

    if args.json:
        keys = ("n", "k", "iterations", "seconds", "g_mult_add_per_s", "empty_clusters")
        Path(args.json).write_text(json.dumps({"machine": machine(device), "rows": [dict(zip(keys, r)) for r in rows]},
                                              indent=2))
    if not args.no_write:
        path = Path(__file__).resolve().parent / "RESULTS.md"
        lines = [] if path.is_file() and "# " in path.read_text() else ["# Benchmark results\n"]
        lines += [
            f"\n## k-means ({time.strftime('%Y-%m-%d')})\n",
            f"Command: `python benchmarks/kmeans.py --device {args.device} --iters {args.iters}`  \n",
            f"Machine: {machine(device)}; F={args.dim}, chunk {args.chunk_size}, synthetic unit vectors\n\n",
            "| N | k | iterations | seconds | G mult-add/s | empty clusters |\n|---|---|---|---|---|---|\n",
        ]
        lines += [f"| {n:,} | {k:,} | {it} | {s:.2f} | {r:.1f} | {e} |\n" for n, k, it, s, r, e in rows]
        with path.open("a", encoding="utf-8") as out:
            out.writelines(lines)
        print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
