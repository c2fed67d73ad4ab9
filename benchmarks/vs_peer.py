"""Side by side with VSE-infinity's own code, in one run, on one data folder.

The peer runs through the harness in `../shared/peer/` (`peer_vse.py`, see its PEER.md: the peer's source in
a scratch folder named by $PEER_SRC, never in this repo, and a venv of its own). This script writes the data
folder the peer reads (`peer_vse.py data`), then alternates the peer's training step and ours on it
(`--rounds` times, so drift of a shared machine hits both), times our CODER and USER steps, and finally the
peer's `evalrank` and our evaluation of the same 1,000-image / 5,000-caption test split.

    PEER_SRC=/scratch/vse_infty_src python benchmarks/vs_peer.py --peer-python /scratch/peer-venv/bin/python \\
        [--data /scratch/peerdata] [--steps 5] [--rounds 2] [--out benchmarks/vs_peer.json]

Training: batch 128, 36 x 2048 regions, a BERT-base-sized encoder with random weights on both sides
(`train-step --bert random`; ours `benchmarks/train_step.py --text bert-base`), each side's own loader over
the same captions. Evaluation: MiniLM-L6 on both sides. Prints a markdown table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from eval_speed import time_eval  # noqa: E402
from train_step import bench  # noqa: E402

DEFAULT_HARNESS = HERE.parents[1] / "shared" / "peer" / "peer_vse.py"


def peer(args, mode: str, *extra: str) -> dict:
    """Run one harness mode in the peer's venv; returns its RESULT json."""
    cmd = [args.peer_python, str(args.harness), mode, "--root", str(args.data), *extra]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"peer harness failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def ours_step(args, method: str) -> dict:
    root = str(args.data / "f30k" / "precomp")
    row = bench(method, "bert-base", torch.device("cpu"), args.steps, 128, root, args.set)
    print(f"  ours {method}: {row['step_s']:.2f} s/step", flush=True)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-python", required=True, help="the python of the peer's venv (PEER.md)")
    parser.add_argument("--harness", type=Path, default=DEFAULT_HARNESS)
    parser.add_argument("--data", type=Path, default=Path("/tmp/peerdata"))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement (after 2 warm-up)")
    parser.add_argument("--rounds", type=int, default=2, help="peer / ours triplet alternations")
    parser.add_argument("--methods", nargs="*", default=["coder_instance", "coder", "user"])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (ours)")
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "vs_peer.json")
    args = parser.parse_args(argv)
    if not os.environ.get("PEER_SRC"):
        sys.exit("set PEER_SRC to the peer's source folder (../shared/peer/PEER.md, step 1)")
    if not (args.data / "f30k" / "precomp" / "train_ims.npy").exists():
        subprocess.run([args.peer_python, str(args.harness), "data", "--root", str(args.data)], check=True)

    peer_steps, our_steps = [], []
    for _ in range(args.rounds):
        peer_steps.append(peer(args, "train-step", "--bert", "random", "--iters", str(args.steps)))
        print(f"  peer: {peer_steps[-1]['median_s_per_iter']:.2f} s/step", flush=True)
        our_steps.append(ours_step(args, "triplet"))
    rows = [ours_step(args, m) for m in args.methods]
    peer_s = statistics.median(r["median_s_per_iter"] for r in peer_steps)
    triplet_s = statistics.median(r["step_s"] for r in our_steps)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads",
              "torch": torch.__version__, "data": str(args.data), "overrides": args.set,
              "peer_train": peer_steps, "ours_triplet": our_steps, "ours_methods": rows,
              "peer_step_s": peer_s, "triplet_step_s": triplet_s}
    table = ["| | VSE-infinity's code | ours | ratio |", "|---|---:|---:|---:|",
             f"| training step, triplet baseline (median of {args.rounds} alternating rounds) | {peer_s:.2f} s | "
             f"{triplet_s:.2f} s | {peer_s / triplet_s:.2f}x faster |"]
    for r in rows:
        table.append(f"| training step, {r['method']} (ours only) | | {r['step_s']:.2f} s | "
                     f"{r['step_s'] / triplet_s:.2f}x our triplet step |")
    if not args.skip_eval:
        peer_eval = peer(args, "eval")
        ours_eval = time_eval(str(args.data / "f30k" / "precomp"), torch.device("cpu"))
        result.update(peer_eval=peer_eval, ours_eval=ours_eval)
        table.append(f"| evaluation, 1,000 images / 5,000 captions, MiniLM-L6 (encode + rank; peer's `evalrank` "
                     f"total {peer_eval['evalrank_total_s']:.1f} s) | {peer_eval['encode_plus_rank_s']:.2f} s | "
                     f"{ours_eval['total_s']:.2f} s | {peer_eval['encode_plus_rank_s'] / ours_eval['total_s']:.2f}x "
                     f"faster |")
    result["table"] = table
    print("\n".join(table))
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
