#!/usr/bin/env bash
# docs/speed.md's GPU measurement, one prepared script for one GPU (about 5-8 minutes on an H100):
#   1. experiments/bench.py: the ViT-B/16 224 preset in bf16, eager and with torch.compile:
#      SemanticMIM, its baseline and a plain ViT of the same tokens; images/s, FLOP/s as a
#      fraction of the bf16 matmul peak measured in the same run, peak memory.
#   2. the CUDA training path end to end on synthetic data: a run stopped at step 6 and
#      resumed against the same run uninterrupted (prints the largest weight difference;
#      GPU kernels such as the backward of gather add with atomics, so it may not be 0).
# Writes everything to ${OUT:-runs/gpu}/ and prints it.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
BATCH=${BATCH:-256}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/card.txt"

BENCH=(--preset vit_b16 --amp bf16 --batch-size "$BATCH" --device cuda)
python experiments/bench.py "${BENCH[@]}" 2>&1 | tee "$OUT/bench_eager.txt"
python experiments/bench.py "${BENCH[@]}" --compile 2>&1 | tee "$OUT/bench_compile.txt"

RUN=(--dataset synthetic --synthetic-size 2048 --preset cifar --batch-size 256 --epochs 2
     --device cuda --log-every 4)
rm -rf "$OUT/full" "$OUT/split"
python train.py "${RUN[@]}" --out "$OUT/full" 2>&1 | tee "$OUT/train.txt"
python train.py "${RUN[@]}" --out "$OUT/split" --stop-at 6 2>&1 | tee -a "$OUT/train.txt"
python train.py --resume --out "$OUT/split" 2>&1 | tee -a "$OUT/train.txt"
python - "$OUT" <<'EOF' 2>&1 | tee -a "$OUT/train.txt"
import sys, torch
a, b = (torch.load(f"{sys.argv[1]}/{r}/checkpoint.pt", map_location="cpu", weights_only=True)
        ["model"] for r in ("full", "split"))
diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
print(f"resumed at step 6 vs uninterrupted, 16 steps on CUDA: largest weight difference {diff:.3g}")
EOF
