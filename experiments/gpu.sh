#!/usr/bin/env bash
# What only a GPU shows, in one script of about 6-10 minutes on one GPU; each check ends in one
# verdict line "PASS|FAIL|SKIP <check>: <what it saw>", and a summary at the end:
#   card      the GPU, driver, torch and CUDA versions
#   bench     experiments/bench.py, the ViT-B/16 224 preset in bf16, eager and torch.compile'd:
#             images/s and FLOP/s against the bf16 matmul peak measured in the same run
#   syncs     the training step under torch.cuda.set_sync_debug_mode: 8 and 16 steps with one
#             progress line must warn as often (the per-run syncs), i.e. none per step
#   folder    torchrun, one NCCL process (DDP), an image folder of 500x375 JPEGs made here,
#             DataLoader workers and pinned memory, at 224 px (ViT-B/16, 4 blocks)
#   sigterm   the same with SIGTERM to torchrun mid-run: a checkpoint after that step
#   resume    torchrun --resume of that checkpoint, two more steps
#   micro     a run in micro-batches of 16 against the same run in batches of 64 (weights)
#   split     a run stopped at step 6 and resumed against the same run uninterrupted
#   compile   train.py --compile, a short run
#   probe     probe.py of the folder run's checkpoint on the GPU (train/ and val/)
#   dense     probe.py --dense single of that checkpoint on the GPU, synthetic garments, all blocks
# Without a GPU it runs the same checks on the CPU with a tiny model (a dry run), and skips the
# CUDA-only ones. Everything goes to ${OUT:-runs/gpu}/; the summary also to $OUT/summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
rm -rf "$OUT" && mkdir -p "$OUT"
verdicts=()
verdict() {  # verdict NAME OK|FAIL|SKIP TEXT
  local word=$2; [ "$word" = OK ] && word=PASS
  verdicts+=("$word $1: $3"); echo "$word $1: $3"
}
if command -v nvidia-smi >/dev/null && python -c "import torch; assert torch.cuda.is_available()"
then
  GPU=1; DEV=cuda; SIZE=500x375; IMAGES=256
  MODEL=(--preset vit_b16 --depth 4); BATCH=64; SMALL=(--preset cifar)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
else
  GPU=0; DEV=cpu; SIZE=40x36; IMAGES=32
  MODEL=(--preset cifar --dim 32 --depth 1 --heads 2); BATCH=16; SMALL=("${MODEL[@]}")
  echo "no GPU: a dry run on the CPU with a tiny model" | tee "$OUT/card.txt"
fi
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/card.txt"
verdict card OK "$(head -1 "$OUT/card.txt")"

# bench: the step against the matmul peak (bench.py synchronises per round of steps, not per step)
if [ $GPU = 1 ]; then
  for mode in eager compile; do
    flag=(); [ $mode = compile ] && flag=(--compile)
    if python experiments/bench.py --preset vit_b16 --amp bf16 --batch-size 256 --device cuda \
        "${flag[@]}" > "$OUT/bench_$mode.txt" 2>&1; then
      verdict "bench $mode" OK "$(grep -m1 '^SemanticMIM' "$OUT/bench_$mode.txt")"
    else verdict "bench $mode" FAIL "$(tail -1 "$OUT/bench_$mode.txt")"; fi
  done
else verdict bench SKIP "the bf16 peak needs a GPU"; fi

# syncs: host-device synchronisations per training step, counted by CUDA itself
if [ $GPU = 1 ]; then
  python - "$OUT" > "$OUT/syncs.txt" 2>&1 <<'EOF'
import sys, warnings, torch, train
counts = []
for n in (512, 1024):                                  # 8 and 16 steps of 64, one progress line
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        train.main(["--dataset", "synthetic", "--synthetic-size", str(n), "--batch-size", "64",
                    "--preset", "cifar", "--log-every", "100", "--out", f"{sys.argv[1]}/syncs{n}"])
    torch.cuda.set_sync_debug_mode(0)
    counts.append(sum("synchroniz" in str(w.message) for w in seen))
print(f"synchronising calls in a run of 8 and of 16 steps: {counts[0]} and {counts[1]}")
sys.exit(counts[0] != counts[1])
EOF
  [ $? = 0 ] && verdict syncs OK "$(tail -1 "$OUT/syncs.txt")" || verdict syncs FAIL "$(tail -1 "$OUT/syncs.txt")"
else verdict syncs SKIP "set_sync_debug_mode needs CUDA (test_semanticmim.py counts them on the CPU)"; fi

# folder: JPEGs of ImageNet's typical size, one NCCL (GPU) or Gloo (CPU) process under torchrun
python - "$OUT/jpegs" "$SIZE" "$IMAGES" <<'EOF'
import os, sys
import numpy as np
from PIL import Image
root, (w, h), n = sys.argv[1], map(int, sys.argv[2].split("x")), int(sys.argv[3])
rng = np.random.default_rng(0)
for split, count in (("train", n), ("val", n // 4)):
    for c in range(2):
        os.makedirs(f"{root}/{split}/class{c}", exist_ok=True)
        for i in range(count):
            x = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) // 2 + 100 * c
            Image.fromarray(x).save(f"{root}/{split}/class{c}/{i}.jpg", quality=90)
EOF
TORCHRUN=(python -m torch.distributed.run --standalone --nproc_per_node=1)
FOLDER=(train.py --data "$OUT/jpegs" "${MODEL[@]}" --batch-size $BATCH --workers 4 --device $DEV
        --log-every 2 --ckpt-minutes 0)
if "${TORCHRUN[@]}" "${FOLDER[@]}" --epochs 2 --out "$OUT/folder" > "$OUT/folder.txt" 2>&1; then
  verdict folder OK "$(grep -m1 -o '[0-9.]* img/s' <(grep 'step' "$OUT/folder.txt" | tail -1)) at the last progress line; $(grep -c '' "$OUT/folder/log.jsonl") log lines"
else verdict folder FAIL "$(tail -1 "$OUT/folder.txt")"; fi

# sigterm and resume: torchrun signals its rank's process group, workers included
"${TORCHRUN[@]}" "${FOLDER[@]}" --epochs 1000 --log-every 100000 --out "$OUT/sig" \
  > "$OUT/sigterm.txt" 2>&1 &
pid=$!
for _ in $(seq 120); do grep -q '^training' "$OUT/sigterm.txt" && break; sleep 1; done
sleep 10; kill -TERM $pid; wait $pid
step=$(python -c "import sys, torch; print(torch.load(sys.argv[1], weights_only=True)['step'])" \
  "$OUT/sig/checkpoint.pt" 2>/dev/null)
if [ -n "$step" ] && grep -q "stopped at step $step" "$OUT/sigterm.txt"; then
  verdict sigterm OK "saved at step $step, 10 s after the start, with $(grep -c 'exited unexpectedly' "$OUT/sigterm.txt") worker deaths"
  if "${TORCHRUN[@]}" train.py --resume --out "$OUT/sig" --stop-at $((step + 2)) > "$OUT/resume.txt" 2>&1 &&
     grep -q "stopped at step $((step + 2))" "$OUT/resume.txt"; then
    verdict resume OK "continued from step $step to $((step + 2))"
  else verdict resume FAIL "$(tail -1 "$OUT/resume.txt")"; fi
else verdict sigterm FAIL "no checkpoint after the signal: $(tail -1 "$OUT/sigterm.txt")"; fi

# micro, split, compile: in-memory synthetic runs (fp32 for micro: the same sums in another order)
RUN=(train.py --dataset synthetic --synthetic-size 1024 "${SMALL[@]}" --batch-size 64 --device $DEV
     --log-every 4)
python "${RUN[@]}" --amp none --out "$OUT/full64" > "$OUT/micro.txt" 2>&1 &&
python "${RUN[@]}" --amp none --micro-batch 16 --out "$OUT/micro16" >> "$OUT/micro.txt" 2>&1
python "${RUN[@]}" --epochs 2 --out "$OUT/full" > "$OUT/split.txt" 2>&1 &&
python "${RUN[@]}" --epochs 2 --out "$OUT/split" --stop-at 6 >> "$OUT/split.txt" 2>&1 &&
python train.py --resume --out "$OUT/split" >> "$OUT/split.txt" 2>&1
diff_of() {  # the largest weight difference of two runs' checkpoints, or nothing
  python -c "import sys, torch; a, b = (torch.load(f, weights_only=True)['model'] for f in sys.argv[1:]); print(f'{max((a[k].float() - b[k].float()).abs().max().item() for k in a):.3g}')" \
    "$1/checkpoint.pt" "$2/checkpoint.pt" 2>/dev/null
}
d=$(diff_of "$OUT/full64" "$OUT/micro16")
[ -n "$d" ] && python -c "assert $d < 1e-3" && verdict micro OK "largest weight difference $d (fp32)" ||
  verdict micro FAIL "largest weight difference '${d}': $(tail -1 "$OUT/micro.txt")"
d=$(diff_of "$OUT/full" "$OUT/split")
[ -n "$d" ] && python -c "assert $d < 1e-3" && verdict split OK "largest weight difference $d (bf16 on a GPU; GPU atomics may make it nonzero)" ||
  verdict split FAIL "largest weight difference '${d}': $(tail -1 "$OUT/split.txt")"
if python "${RUN[@]}" --compile --out "$OUT/compile" > "$OUT/compile.txt" 2>&1; then
  verdict compile OK "$(grep 'step 16/16' "$OUT/compile.txt")"
else verdict compile FAIL "$(tail -1 "$OUT/compile.txt")"; fi

# probe: the folder run's checkpoint, features and classifiers on the device
if python probe.py "$OUT/folder/checkpoint.pt" --device $DEV --epochs 5 --workers 4 \
    --out "$OUT/probe.json" > "$OUT/probe.txt" 2>&1; then
  verdict probe OK "$(grep -m1 '^checkpoint patch' "$OUT/probe.txt")"
else verdict probe FAIL "$(tail -1 "$OUT/probe.txt")"; fi

# dense: the dense probe's head, upsampling matrix and confusion counts on the device
if python probe.py "$OUT/folder/checkpoint.pt" --device $DEV --dense single --dataset synthetic \
    --layer all --epochs 3 --out "$OUT/dense.json" > "$OUT/dense.txt" 2>&1; then
  verdict dense OK "$(grep -m1 '^checkpoint map' "$OUT/dense.txt")"
else verdict dense FAIL "$(tail -1 "$OUT/dense.txt")"; fi

printf '%s\n' "== summary ($(head -1 "$OUT/card.txt"))" "${verdicts[@]}" | tee "$OUT/summary.txt"
! grep -q '^FAIL' "$OUT/summary.txt"
