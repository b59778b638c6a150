#!/usr/bin/env bash
# The GPU figures in one call of a lent machine: the train step's MFU and the sampler against the original's
# loop at identical tokens, each stage with its own time limit and log under $OUT (one failing stage does not
# cost the others). The machine's image brings jax, flax and torch (its jax 0.11.2 needs its own flax 0.12.10,
# not our pinned 0.12.8); the rest of our pins (optax, orbax-checkpoint, grain, array-record, ml_collections,
# chex, portpicker) travel as wheels in .whl (`pip download --no-deps --only-binary=:all: --python-version 3.12
# --platform manylinux_2_28_x86_64 ... -d .whl NAME==VERSION`).
#   bash bench/gpu.sh [STAGE...]   (on the GPU machine, from the repository root; default: train sampler;
#                                   the others: train_trace, train_noscan, train_pallas,
#                                   train_noremat, train_accum, train_notriton, sampler16)
# The attention kernels' table (docs/ATTENTION.md): python3 bench/attention.py --impls
#   dense,blockwise,cudnn,pallas_gpu --dtype bfloat16 --tokens 2048,8192 --what op --repeats 5
set -u
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
python3 -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, jax.devices())"
stage() {  # name, seconds, command...
  local name=$1 lim=$2; shift 2
  echo "=== $name (limit ${lim}s) $(date +%T)"
  timeout "$lim" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -vE "^(WARNING|I0000|W0000|E0000)|^\s*$" "$OUT/$name.log" | tail -25
  echo "=== $name rc=$rc $(date +%T)"
  return $rc
}
# LLaDA-8B's layer (d 4096, 32 heads of 128; MLP 3x here), 8 layers, the released vocabulary; stage 2's 8192
# tokens a step; bf16 compute, float32 parameters and AdamW. bench/train.py's remat policy, minimal_with_context,
# keeps every matmul's output and recomputes the elementwise work (H100: 46.6% MFU, 48.4 GiB, against 45.0% and
# 62.1 GiB keeping everything, train_noremat: over JAX's default 75% of an H100's memory, hence the 0.95).
TRAIN="python3 bench/train.py --width 4096 --vocab 126464 --seq 2048 --dtype bfloat16 --chunk 2048 --steps 3 --layers 8"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
for s in ${@:-train sampler}; do
  case $s in
    train) stage train 150 $TRAIN --batch 4 ;;
    train_noremat) stage train_noremat 150 $TRAIN --batch 4 --remat none ;;
    # the profile: without CUDA graphs, so that each kernel is named by its op in the optimized HLO
    train_trace) XLA_FLAGS=--xla_gpu_enable_command_buffer= stage train_trace 150 $TRAIN --batch 4 \
      --trace /tmp/trace --hlo "$OUT/train_hlo.txt.gz" ;;
    train_noscan) XLA_FLAGS=--xla_gpu_enable_command_buffer= stage train_noscan 150 $TRAIN --batch 4 --no-scan \
      --trace /tmp/trace_noscan --hlo "$OUT/train_noscan_hlo.txt.gz" ;;
    # the Triton flash kernel with segment ids in place of cuDNN's (which takes the segment mask as a bias)
    train_pallas) stage train_pallas 150 $TRAIN --batch 4 --attention pallas_gpu ;;
    sampler16) XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 stage sampler16 120 python3 bench/sampler.py --torch_device cuda \
      --precision highest --prompts 32 --rows 16 ;;
    # micro-batches: the optimizer's pass over the parameters spread over 16384 tokens
    train_accum) stage train_accum 120 $TRAIN --batch 8 --accum 4 ;;
    train_notriton) XLA_FLAGS=--xla_gpu_enable_triton_gemm=false stage train_notriton 100 $TRAIN --batch 4 ;;
    sampler) XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 stage sampler 120 python3 bench/sampler.py --torch_device cuda \
      --precision highest --prompts 32 --rows 32 ;;
    *) echo "unknown stage $s"; exit 2 ;;
  esac
done
