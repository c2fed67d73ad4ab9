#!/usr/bin/env bash
# GPU smoke test + GPU benchmarks, for a machine with a CUDA GPU (no network needed, installs nothing).
# Runs: one demo epoch on CUDA (bf16 autocast), the training-step benchmark at the paper's shapes
# (batch 128, 36x2048, BERT-base) for the triplet baseline, CODER and USER, and the full-size k-means
# benchmark (145,000 x 1,024 -> 10,000). Prints a short table last. Needs torch >= 2.4, transformers >= 4.40.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
python -c "import torch, transformers; assert torch.cuda.is_available(), 'no CUDA device'; \
print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
python train.py --config configs/demo.yaml --no-progress --output "$out/demo" \
    --set train.device=cuda --set train.epochs=1 --set data.num_workers=4 | tail -n 6
python benchmarks/train_step.py --device cuda --methods triplet coder_instance coder user \
    --out "$out/train_step.json" | tee "$out/train_step.txt"
python benchmarks/kmeans.py --device cuda | tee "$out/kmeans.txt"
echo "== summary =="
cat "$out/train_step.txt"
tail -n 3 "$out/kmeans.txt"
