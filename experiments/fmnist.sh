#!/usr/bin/env bash
# The README's Fashion-MNIST experiment, offline on a 2-core CPU: SemanticMIM against its
# one-stream baseline (same preset, target, mask ratio, schedule, seed), then the number of
# proxies on a shorter budget. Two runs at a time, one thread each. A finished run is skipped
# (train.py --resume says "nothing to do"), an interrupted one continues exactly.
# Needs data/FashionMNIST/raw/ (see README). Writes runs/ and docs/figures/.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
DATA=${DATA:-data}
COMMON=(--dataset fashion_mnist --data "$DATA" --dim 128 --depth 4 --heads 4 --batch-size 256
        --blr 1e-3 --log-every 50)
mkdir -p runs docs/figures

train() {  # train OUT ARGS...: a new run, or the rest of an existing one
  local out=$1; shift
  if [ -f "$out/checkpoint.pt" ]; then python train.py --resume --out "$out"
  else python train.py "$@" --out "$out"; fi >> "$out.txt" 2>&1
}

# 1. SemanticMIM against its baseline: 4 epochs (936 steps) each, seed 0 then seed 1
train runs/fmnist_semantic "${COMMON[@]}" --seed 0 --epochs 4 &
train runs/fmnist_baseline "${COMMON[@]}" --seed 0 --epochs 4 --baseline &
wait
python visualize.py runs/fmnist_semantic/checkpoint.pt --compare runs/fmnist_baseline/checkpoint.pt \
  --indices 0 1 2 --out docs/figures > runs/figures.txt
python probe.py runs/fmnist_semantic/checkpoint.pt > runs/probe_semantic.txt &
python probe.py runs/fmnist_baseline/checkpoint.pt --rows checkpoint random > runs/probe_baseline.txt &
wait
train runs/fmnist_semantic_s1 "${COMMON[@]}" --seed 1 --epochs 4 &
train runs/fmnist_baseline_s1 "${COMMON[@]}" --seed 1 --epochs 4 --baseline &
wait
for run in semantic_s1 baseline_s1; do
  python probe.py runs/fmnist_$run/checkpoint.pt --rows checkpoint random > runs/probe_$run.txt &
done
wait

# 2. The number of proxies P, 1 epoch (234 steps) each
for pair in "1 4" "8 16"; do
  for P in $pair; do
    train runs/fmnist_p$P "${COMMON[@]}" --seed 0 --epochs 1 --num-proxies "$P" &
  done
  wait
done
for pair in "1 4" "8 16"; do
  for P in $pair; do
    python probe.py runs/fmnist_p$P/checkpoint.pt --rows checkpoint > runs/probe_p$P.txt &
  done
  wait
done
echo "done: runs/*/probe_*.json, docs/figures/"
