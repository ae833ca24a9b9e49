#!/usr/bin/env bash
# Issue 8's GPU measurements in one device call (each step time-boxed; a failing step does not stop
# the rest). Results: bench/results/gpu_*.json, copied to $OUT (the device tool brings them back).
#   bash bench/gpu/run_device.sh            # everything (~10 min on one H100/H200)
#   STEPS="sampler train" bash bench/gpu/run_device.sh
#   STEPS=models bash bench/gpu/run_device.sh   # issue 4: every model family, one rollout + one LoRA step
#                                               # (~5 min; not in the default list, which fills a 10-min call)
set -u
cd "$(dirname "$0")"
PY=${PY:-python}
STEPS=${STEPS:-"sampler compiled train epoch flux"}
OUT=${OUT:-/tmp/flowrl-gpu-bench}
mkdir -p "$OUT"
step() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v "Casting directly\|^Loading\|it/s\]" | tail -20
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
for s in $STEPS; do
  case $s in
    sampler)  step sampler 180 $PY sampler.py --model sd3-5 --batch 8 16 32 ;;
    compiled) step sampler_compiled 300 $PY sampler.py --model sd3-5 --batch 16 --compile default \
                --out ../results/gpu_sampler_compiled_sd3-5.json ;;
    train)    step train_step 180 $PY train_step.py --model sd3-5 --algorithm grpo --batch 8
              step train_step_ckpt 180 $PY train_step.py --model sd3-5 --algorithm grpo --batch 8 --gradient-checkpointing ;;
    epoch)    step epoch_grpo 420 $PY epoch.py --algorithm grpo --epochs 3 ;;
    nft)      step epoch_nft 420 $PY epoch.py --algorithm nft --epochs 3 ;;
    awm)      step epoch_awm 420 $PY epoch.py --algorithm awm --epochs 3 ;;
    flux)     step sampler_flux 240 $PY sampler.py --model flux1 --batch 8 ;;
    models)   step models 540 $PY models.py ;;  # rewrites gpu_models.json after each family
  esac
done
cp ../results/gpu_*.json "$OUT"/ 2>/dev/null
ls -la "$OUT"
