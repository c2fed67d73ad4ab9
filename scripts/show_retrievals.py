"""See what a model retrieves: one self-contained HTML page of sampled queries and their top 5.

    python scripts/show_retrievals.py --checkpoint runs/demo/model_best.pth [--split test] [--queries 20]
        [--seed 0] [--images DIR] [--query "a man riding a red bicycle"] [--out report.html]

For image->text and text->image queries: the top 5 with their scores, hit or miss, the ground truth with
its rank when it is not in the top 5; for CODER checkpoints the concepts each query and result attends to
(Eq. 2) and the instance and concept scores of the fused S (§3.5). The logic lives in coder/report.py.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="model_best.pth or checkpoint_last.pth")
    parser.add_argument("--split", help="split to show (default: the config's data.test_split)")
    parser.add_argument("--queries", type=int, default=20, help="sampled queries per direction (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the query sample")
    parser.add_argument("--images", help="folder of the split's images, named by S_ids.txt (<id>.jpg/.png)")
    parser.add_argument("--query", help="also rank the split's images for this typed caption")
    parser.add_argument("--top", type=int, default=5, help="results per query (default 5)")
    parser.add_argument("--concepts", type=int, default=5, help="concepts shown per item (default 5)")
    parser.add_argument("--out", default="report.html", help="the HTML file to write (default report.html)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a data.*/eval.* key or model.concept.vocab, e.g. --set data.root=/data/f30k")
    parser.add_argument("--cache", help="embedding cache file or folder (default: the checkpoint's folder, file "
                        "<checkpoint stem>.report_<split>.pt); reused while checkpoint and data are unchanged")
    parser.add_argument("--no-cache", action="store_true", help="encode the split, no cache read or written")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    from coder.checkpoint import CheckpointError
    from coder.config import ConfigError
    from coder.demo.visual import scene_describer
    from coder.engine import resolve_device
    from coder.report import build_report, render_html

    if args.queries < 0 or args.top < 1 or args.concepts < 1:
        print("error: --queries must be >= 0, --top and --concepts >= 1", file=sys.stderr)
        return 2
    cache = None
    if not args.no_cache:
        cache = args.cache or Path(args.checkpoint).parent
    try:
        report = build_report(args.checkpoint, split=args.split, queries=args.queries, seed=args.seed,
                              images_dir=args.images, query_text=args.query, k=args.top,
                              n_concepts=args.concepts, overrides=args.overrides,
                              device=resolve_device(args.device), cache=cache, describe_images=scene_describer)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render_html(report, args.top), encoding="utf-8")
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({len(report.blocks)} queries) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
