#!/usr/bin/env bash
# The 2-epoch Fashion-MNIST experiment of docs/results.md, offline on a 2-core CPU: three models
# on the same data, schedule and budget, two seeds each, then probes, attention statistics and
# figures.
#   semantic  SemanticMIM, P 8, mask ratio 0.8 (the authors' configs/maskfeat/maskfeat_bottleneck_pretrain.py)
#   baseline  the one-switch baseline: --baseline, same P and ratio
#   maskfeat  the authors' MaskFeat baseline settings: --baseline --num-proxies 1 --mask-ratio 0.4
#             (configs/maskfeat/maskfeat_baseline_pretrain.py; its one proxy is their [CLS])
# Runs go two at a time, one thread each. A finished run is skipped (train.py --resume says
# "nothing to do"), an interrupted one continues exactly.
# Needs data/FashionMNIST/raw/ (see README). Writes runs/, docs/figures/, experiments/results/
# fmnist.json and the tables of the pages (summarize.py --save).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
DATA=${DATA:-data}
COMMON=(--dataset fashion_mnist --data "$DATA" --dim 128 --depth 4 --heads 4 --batch-size 256
        --blr 1e-3 --amp none --epochs 2 --log-every 50)   # the cifar preset's defaults, 2 epochs
declare -A MODEL=([semantic]="" [baseline]="--baseline"
                  [maskfeat]="--baseline --num-proxies 1 --mask-ratio 0.4")
mkdir -p runs docs/figures

train() {  # train OUT ARGS...: a new run, or the rest of an existing one
  local out=$1; shift
  if [ -f "$out/checkpoint.pt" ]; then python train.py --resume --out "$out"
  else python train.py "$@" --out "$out"; fi >> "$out.txt" 2>&1
}
run_of() {  # run_of NAME SEED -> runs/fmnist_NAME[_s1]
  echo "runs/fmnist_$1$([ "$2" = 0 ] || echo "_s$2")"
}
lane() {  # lane NAME:SEED ...: train each run, then probe it: linear and kNN of the patch mean
  for job in "$@"; do  # and the proxy mean at every main block (the raw pixels once)
    local run rows=checkpoint
    run=$(run_of "${job%:*}" "${job#*:}")
    [ "$job" = semantic:0 ] && rows="checkpoint pixels"
    # shellcheck disable=SC2086
    train "$run" "${COMMON[@]}" --seed "${job#*:}" ${MODEL[${job%:*}]}
    # shellcheck disable=SC2086
    [ -f "$run/probe_patch-proxy_Lall.json" ] || python probe.py "$run/checkpoint.pt" \
      --pool patch proxy --layer all --rows $rows > "$run.probe.txt" 2>&1
  done
}

# 1. Pre-training and probes: 2 epochs (468 steps) each, six runs in two lanes
lane semantic:0 maskfeat:0 baseline:1 &
lane baseline:0 semantic:1 maskfeat:1 &
wait

# 2. Attention statistics of the three models, a table each (visualize.py --stats: 1,000 test
#    images, every block; attn_stats.json beside the SemanticMIM run, attn_stats.png), and the
#    patch-query maps of the three on the same test images (seed 0 into docs/figures)
STATS=(--stats --what compare --indices 0 1 2)
python visualize.py runs/fmnist_semantic/checkpoint.pt "${STATS[@]}" --out docs/figures \
  --compare runs/fmnist_baseline/checkpoint.pt runs/fmnist_maskfeat/checkpoint.pt > runs/stats.txt
python visualize.py runs/fmnist_semantic_s1/checkpoint.pt "${STATS[@]}" --out runs/figures_s1 \
  --compare runs/fmnist_baseline_s1/checkpoint.pt runs/fmnist_maskfeat_s1/checkpoint.pt \
  > runs/stats_s1.txt
python visualize.py runs/fmnist_semantic/checkpoint.pt --out docs/figures \
  --what query reduce_mean proxy mask_proxy recon curve > runs/figures.txt

# 3. The default laptop run (`python train.py` on Fashion-MNIST: the cifar preset, 1 epoch), four
#    seeds, each with its attention statistics and probe: what do its figures vary by?
for s in 0 1 2 3; do train "runs/default_s$s" --dataset fashion_mnist --data "$DATA" --seed "$s"
  python visualize.py "runs/default_s$s/checkpoint.pt" --stats > "runs/stats_default_s$s.txt"
  python probe.py "runs/default_s$s/checkpoint.pt" --rows checkpoint random > "runs/probe_default_s$s.txt"
done

python experiments/summarize.py runs fmnist --save | tee runs/summary.txt
