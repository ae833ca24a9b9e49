#!/usr/bin/env bash
# The GPU measurements of issues 8 and 4 in one device call. Every step is time-boxed by its own cap
# and by one deadline for the whole script (DEADLINE seconds after it starts), so the call ends
# inside the device tool's 10-minute limit with what it measured; a failing step does not stop the
# rest. Results: bench/results/gpu_*.json; they and the logs are packed into $OUT/gpu_results.tgz
# after every step (the device tool brings back at most 8 files).
#   bash bench/gpu/run_device.sh                       # the default list, in this order
#   STEPS="sampler train" bash bench/gpu/run_device.sh
#   EAGER_BATCH= SAMPLER_TAG=variants STEPS="compiled_epoch sampler" bash bench/gpu/run_device.sh
#       # no eager sampler rows (they are in gpu_sampler_sd3-5.json), the rest to gpu_sampler_sd3-5_variants.json
#   STEPS=toy bash bench/gpu/run_device.sh             # issue 3: toy_algorithms_gpu.json (then, here:
#       # python bench/toy_algorithms.py --from bench/results/toy_algorithms_gpu.json); STEPS=toylong likewise
#   STEPS="pretrain binding" bash bench/gpu/run_device.sh  # issue 3: a base with wider text encoders, and
#       # whether it binds (bench/results/toy_binding_gpu.json; the pipeline comes back as $OUT/toy_sd3_bind.tgz);
#       # PT_WIDTH / PT_LAYERS size the text encoders, PT_DIT_LAYERS the MMDiT, PT_STEPS the run
# Wheels the device lacks (diffusers, pydantic, ...) are installed from .whl/ when it exists
# (fetch them here with bench/gpu/fetch_wheels.sh).
set -u
START=$(date +%s)
DEADLINE=${DEADLINE:-570}
cd "$(dirname "$0")"
WHEELS=${WHEELS:-../../.whl}
if [ -d "$WHEELS" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # nothing outside the device is reachable
PY=${PY:-python3}
STEPS=${STEPS:-"sampler epoch compiled_epoch models train flux ckpt awm nft gputests"}
OUT=${OUT:-/tmp/flowrl-gpu-bench}
LOGS=/tmp/flowrl-gpu-logs
mkdir -p "$OUT" "$LOGS"
pack() { tar czf "$OUT/gpu_results.tgz" -C .. results/ -C /tmp flowrl-gpu-logs 2>/dev/null; }
step() {  # name, cap in seconds, command...
  local name=$1 cap=$2; shift 2
  local left=$((DEADLINE - ($(date +%s) - START)))
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -lt 30 ]; then echo "=== $name: skipped, ${left}s left"; return; fi
  echo "=== $name (limit ${cap}s, t=$(($(date +%s) - START))s): $*"
  timeout "$cap" "$@" > "$LOGS/$name.log" 2>&1
  echo "    rc=$? after $(($(date +%s) - START))s"
  grep -v "Casting directly\|^Loading\|it/s\]\|s/it\]" "$LOGS/$name.log" | tail -6
  pack
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$LOGS/gpu.csv" 2>&1
$PY -c "import torch, diffusers, transformers, peft; print(torch.__version__, diffusers.__version__, transformers.__version__, peft.__version__)"
# the toy steps' batches: 16 prompts x 16 samples an epoch, micro-batches of 64, 2 optimizer steps
TOY_GPU_BATCH="--set train.unique_sample_num_per_epoch=16 --set train.group_size=16 --set train.per_device_batch_size=64
  --set train.gradient_step_per_epoch=2 --set eval.per_device_batch_size=376"
for s in $STEPS; do
  case $s in
    sampler)  step sampler 240 $PY sampler.py --model sd3-5 --eager-batch ${EAGER_BATCH-8 16 32} --batch 16 \
                --compile default --iters 3 --warmup 1 \
                --variants noise_on_device cudnn_benchmark channels_last_vae compiled_vae \
                --profile ../results/gpu_sampler_profile_sd3-5.txt \
                --out ../results/gpu_sampler_sd3-5${SAMPLER_TAG:+_$SAMPLER_TAG}.json ;;
    train)    step train_step 90 $PY train_step.py --model sd3-5 --algorithm grpo --batch 8 --iters 3 --warmup 1 ;;
    ckpt)     step train_step_ckpt 90 $PY train_step.py --model sd3-5 --algorithm grpo --batch 8 \
                --gradient-checkpointing --iters 3 --warmup 1 ;;
    models)   # FAMILIES="flux2 wan2_t2v" MODELS_OUT=../results/gpu_models_2.json: some families, another file
              step models 200 $PY models.py ${FAMILIES:+--families $FAMILIES} ${MODELS_OUT:+--out $MODELS_OUT} ;;
    fluxdiag) # FLUX.1's LoRA backward: where the illegal memory access comes from, and whether another kernel avoids it
              step models_flux1_blocking 50 env CUDA_LAUNCH_BLOCKING=1 $PY models.py --families flux1 --no-isolate \
                --repeats 1 --out ../results/gpu_models_flux1_blocking.json
              step models_flux1_flash 45 $PY models.py --families flux1 --no-isolate --repeats 1 \
                --attn-backend _native_flash --out ../results/gpu_models_flux1_flash.json ;;
    epoch)    step epoch_grpo 170 $PY epoch.py --workdir /tmp/flowrl-epoch --algorithm grpo --epochs 2 ;;
    compiled_epoch) step epoch_grpo_compiled 420 $PY epoch.py --workdir /tmp/flowrl-epoch --algorithm grpo \
                --epochs 3 --compile default ${ROLLOUT_BATCH:+--rollout-batch $ROLLOUT_BATCH} ;;
    flux)     step sampler_flux 90 $PY sampler.py --model flux1 --batch 8 --iters 3 --warmup 1 ;;
    nft)      step epoch_nft 150 $PY epoch.py --workdir /tmp/flowrl-epoch --algorithm nft --epochs 2 ;;
    gputests) step gpu_tests 120 $PY -m pytest -q -m gpu -p no:cacheprovider --rootdir ../.. \
                ../../tests/shared/test_learned_rewards.py ../../tests/shared/test_rollout_noise.py \
                ../../tests/trainer/test_overlap_scoring.py ../../tests/trainer/test_memory_options.py \
                ../../tests/trainer/test_device_placement.py ;;
    toy)      # issue 3: the four algorithms on the toy world, equal budgets, make demo's CFG-free protocol
              # (bench/toy_cfgfree.set, as the CPU table), GPU-sized batches (TOY_SET replaces them)
              step toy_algorithms 560 $PY ../toy_algorithms.py --device gpu --budget ${TOY_BUDGET:-90} --eval-freq 10 \
                --out-dir /tmp/flowrl-toy --set-file ../toy_cfgfree.set ${TOY_SET-$TOY_GPU_BATCH} ;;
    toylong)  # issue 3: one recipe for most of a call (the 0.90 held-out target), its own JSON and docs section;
              # default examples/toy/nft_10min.yaml (CFG-free NFT with a KL anchor, the best CPU recipe, e22)
              step toy_long 570 $PY ../toy_algorithms.py --device gpu --tag long --algorithms ${TOY_ALGORITHM:-nft_10min} \
                --budget ${TOY_LONG_BUDGET:-420} --eval-freq 20 --out-dir /tmp/flowrl-toy ${TOY_SET-$TOY_GPU_BATCH} ;;
    pretrain) # issue 3: a base with wider text encoders, pretrained on the GPU (saved only at the end: keep
              # PT_STEPS inside the cap), brought back as $OUT/toy_sd3_bind.tgz; then STEPS=binding checks it binds
              step pretrain_toy 400 $PY ../../scripts/pretrain_toy.py --device cuda --text-width ${PT_WIDTH:-128} \
                --text-layers ${PT_LAYERS:-4} --dit-layers ${PT_DIT_LAYERS:-4} --num-images 100000 --dit-steps ${PT_STEPS:-8000} --dit-batch 256 \
                --eval-every 2000 --guidance 1.0 --target 1.1 --lr-decay --out /tmp/flowrl-toy/toy-sd3-bind \
                --workdir /tmp/flowrl-toy/pretrain
              [ -f /tmp/flowrl-toy/toy-sd3-bind/pretrain.json ] && tar czf "$OUT/toy_sd3_bind.tgz" -C /tmp/flowrl-toy toy-sd3-bind ;;
    binding)  # issue 3: where the pretrained base fails (bench/toy_binding.py): binding given presence above chance?
              step toy_binding 120 $PY ../toy_binding.py --model ${BIND_MODEL:-/tmp/flowrl-toy/toy-sd3-bind} \
                --device cuda --threads 8 --prompts 24 --seeds 16 --out ../results/toy_binding_gpu.json ;;
    awm)      step epoch_awm 150 $PY epoch.py --workdir /tmp/flowrl-epoch --algorithm awm --epochs 2 ;;
  esac
done
pack
ls -la "$OUT"
