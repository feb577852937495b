#!/usr/bin/env bash
# The three Fashion-MNIST models of docs/results.md (see fmnist.sh) at a longer schedule, with a
# per-epoch trend: each run is trained one epoch per train.py call (--stop-at, then --resume) and
# keeps a copy ep<E>.pt of every epoch's last checkpoint. Then each run is fine-tuned with the
# authors' recipe and with ours (experiments/finetune.py; SemanticMIM's run also fine-tunes the
# same ViT from random init; FT_EPOCHS=0: not),
# experiments/trend.py probes the copies (kNN), and probe.py (every block: linear and kNN, and
# --dense on both garment sets) and visualize.py --stats take the final checkpoint. Last,
# summarize.py keeps every run's figures in experiments/results/ (in git: run folders die with
# their machine), rewrites the tables of the pages and prints them; trend.py draws the figure.
#   EPOCHS=8 bash experiments/long.sh semantic:0 baseline:0 maskfeat:0   # runs/long8_NAME_sSEED
# Each NAME:SEED runs in its own process with one thread, all at once. Rerun to continue: a
# finished epoch is skipped, an interrupted one continues exactly.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
DATA=${DATA:-data} EPOCHS=${EPOCHS:-8} STEPS=234   # 60,000 // 256 steps an epoch
FT_EPOCHS=${FT_EPOCHS:-2}                            # fine-tuning epochs (experiments/finetune.py)
COMMON=(--dataset fashion_mnist --data "$DATA" --dim 128 --depth 4 --heads 4 --batch-size 256
        --blr 1e-3 --amp none --epochs "$EPOCHS" --log-every 50)   # fmnist.sh's, longer
declare -A MODEL=([semantic]="" [baseline]="--baseline"
                  [maskfeat]="--baseline --num-proxies 1 --mask-ratio 0.4")
mkdir -p runs

lane() {  # lane NAME SEED: the epochs and their copies, fine-tuning, the trend, the final probe
  local out=runs/long${EPOCHS}_$1_s$2 e step
  mkdir -p "$out"
  for e in $(seq 1 "$EPOCHS"); do
    [ -f "$out/ep$e.pt" ] && continue
    step=$( [ -f "$out/checkpoint.pt" ] && python -c "import train; print(train.read_checkpoint(
      '$out/checkpoint.pt', needs=('step',))['step'])" || echo 0)
    if [ "$step" = 0 ]; then  # shellcheck disable=SC2086
      python train.py "${COMMON[@]}" --seed "$2" ${MODEL[$1]} --out "$out" --stop-at $STEPS
    elif [ "$step" != $((e * STEPS)) ]; then
      python train.py --resume --out "$out" --stop-at $((e * STEPS))
    fi >> "$out.txt" 2>&1
    cp "$out/checkpoint.pt" "$out/ep$e.tmp" && mv "$out/ep$e.tmp" "$out/ep$e.pt"
  done
  for ft in $( [ "$FT_EPOCHS" = 0 ] || echo pretrained:authors pretrained:ours random:authors \
              random:ours); do   # both recipes; SemanticMIM's run also: the random-init ViT
    [ "${ft%:*}" = pretrained ] || [ "$1" = semantic ] || continue
    local name=$out/finetune$([ "${ft%:*}" = random ] && echo _random)$(
      [ "${ft#*:}" = ours ] && echo _ours)_s$2
    [ -f "$name.json" ] || python experiments/finetune.py "$out/checkpoint.pt" --epochs \
      "$FT_EPOCHS" --seed "$2" --recipe "${ft#*:}" $([ "${ft%:*}" = random ] && echo --random) \
      > "$name.txt" 2>&1
  done
  python experiments/trend.py "$out" >> "$out.txt" 2>&1
  [ -f "$out/probe_patch-proxy_Lall.json" ] || python probe.py "$out/checkpoint.pt" \
    --pool patch proxy --layer all --rows checkpoint > "$out.probe.txt" 2>&1
  for set in single mosaic; do  # the reference rows once, in SemanticMIM's run (7 GB; else 4)
    [ -f "$out/probe_dense-${set}_Lall.json" ] || python probe.py "$out/checkpoint.pt" --dense \
      $set --layer all $([ "$1" = semantic ] || echo --rows checkpoint) > "$out.dense_$set.txt" 2>&1
  done
  python visualize.py "$out/checkpoint.pt" --stats --out "$out" > "$out.stats.txt" 2>&1
}

for job in "$@"; do lane "${job%:*}" "${job#*:}" & done
wait
# the runs' figures, kept in git (experiments/results/long<EPOCHS>.json), and the trend figure
python experiments/summarize.py runs "long$EPOCHS" --save | tee "runs/long${EPOCHS}_summary.txt"
python experiments/trend.py --plot "experiments/results/long$EPOCHS.json" \
  --out "runs/long${EPOCHS}_trend.png"
