#!/usr/bin/env bash
# GPU smoke test + GPU benchmarks for a machine with one CUDA GPU, after `pip install -r requirements.txt`
# (no network needed, installs nothing). About 5 minutes on an H100. Runs:
#   1. one demo epoch on CUDA (bf16 autocast): the training loop, k-means and evaluation end to end;
#   2. the training step at the paper's shapes (batch 128, 36 x 2048, BERT-base) for the triplet baseline,
#      CODER's instance branch, full CODER and USER, under bf16 autocast and in fp32 with TF32;
#   3. VSE-infinity's own step on the same GPU, when PEER_SRC and PEER_PYTHON are set (../shared/peer/PEER.md);
#   4. k-means at F30K size (145,000 x 1,024 -> 10,000);
#   5. COCO 5K evaluation (5,000 images / 25,000 captions, five 1K folds + 5K), fp32 and bf16 encoding.
# Everything lands in $OUT (default /tmp/gpu_check); gpu_check.json gathers it in one file.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
python -c "import torch, transformers; assert torch.cuda.is_available(), 'no CUDA device'; \
print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
python train.py --config configs/demo.yaml --no-progress --output "$out/demo" \
    --set train.device=cuda --set train.epochs=1 --set data.root="$out/demo_data" --set data.num_workers=4 \
    | tail -n 6
methods="triplet coder_instance coder user"
python benchmarks/train_step.py --device cuda --methods $methods --out "$out/train_step_bf16.json"
python benchmarks/train_step.py --device cuda --methods $methods --set train.amp=false \
    --out "$out/train_step_fp32_tf32.json"
if [[ -n "${PEER_SRC:-}" && -n "${PEER_PYTHON:-}" ]]; then
    harness=${PEER_HARNESS:-../shared/peer/peer_vse.py}
    "$PEER_PYTHON" "$harness" data --root "$out/peerdata" >/dev/null
    "$PEER_PYTHON" "$harness" train-step --root "$out/peerdata" --bert random --iters 10 | tee "$out/peer_step.txt"
    grep '^RESULT ' "$out/peer_step.txt" | sed 's/^RESULT //' > "$out/peer_step.json"
else
    echo "peer step skipped: set PEER_SRC and PEER_PYTHON (../shared/peer/PEER.md)"
fi
python benchmarks/kmeans.py --device cuda --no-write --json "$out/kmeans.json"
python benchmarks/eval_speed.py --device cuda --test-images 5000 --fold5 --out "$out/eval_coco5k_fp32.json"
python benchmarks/eval_speed.py --device cuda --test-images 5000 --fold5 --amp --out "$out/eval_coco5k_bf16.json"
python - "$out" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
merged = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.name != "gpu_check.json"}
(out / "gpu_check.json").write_text(json.dumps(merged, indent=2))
print("== summary ==")
for name in ("train_step_bf16", "train_step_fp32_tf32"):
    for row in merged[name]["rows"]:
        print(f"{name:22s} {row['method']:15s} {row['step_s']:.3f} s/step  peak {row['peak_mb']:.0f} MB")
if "peer_step" in merged:
    print(f"peer (VSE-infinity) step  {merged['peer_step']['median_s_per_iter']:.3f} s/step")
for row in merged["kmeans"]["rows"]:
    print(f"k-means N={row['n']:,} k={row['k']:,}: {row['seconds']:.2f} s")
for name in ("eval_coco5k_fp32", "eval_coco5k_bf16"):
    e = merged[name]
    print(f"{name}: encode {e['encode_s']:.2f} s, rank {e['rank_s']:.2f} s, total {e['total_s']:.2f} s")
print(f"written {out / 'gpu_check.json'}")
EOF
