#!/usr/bin/env bash
# Every GPU measurement of the project in one call on a lent H100/H200 (about 8 minutes in all):
#   1. bench/synth.py  SD1.5 layout, fp16, 256x256, T=70 lambda=0.5 (35 steps), batch 128, channels-last:
#      eager, then torch.compile of the UNet; both against diffusers' img2img pipeline image by image
#   2. bench/distill.py  student step from shards vs from memory (target: within 10%)
#   3. bench/models.py   teacher/student latency and peak memory at 256x256 and 480x320
#   4. the CUDA tests (networks and metrics on the GPU equal the CPU)
# The GPU image has torch but not diffusers/webdataset: carry `.whl` (diffusers, webdataset, braceexpand).
#   device run: bash bench/gpu_all.sh   (carry [".whl"], timeout_s 580)
# Writes $OUT/env.txt, synth_eager.json, synth_compiled.json, distill.json, models.json, all.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/d4ir_gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
if ! "$PY" -c "import diffusers, webdataset" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$PY" -c "import torch, torchvision, diffusers; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'diffusers', diffusers.__version__)"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step() {  # step NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | grep -v -e "low_cpu_mem_usage" -e "pip install accelerate"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s"
}

SYNTH=(bench/synth.py --model sd15-layout --device cuda --dtype float16 --size 256 --steps 70 --strength 0.5
       --batch 128 --n-images 384 --baseline-images 8 --vae-batch 32 --channels-last)
{
    step synth_eager 140 "$PY" "${SYNTH[@]}" --warmup 1 --json-out "$OUT/synth_eager.json"
    step distill 90 "$PY" bench/distill.py --device cuda --student half-airnet --teacher airnet --crop 256 \
        --batch-size 8 --num-workers 6 --json-out "$OUT/distill.json"
    step models 80 "$PY" bench/models.py --device cuda --json-out "$OUT/models.json"
    step cuda_tests 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_networks.py tests/test_metrics.py -k cuda
    step synth_compiled 190 "$PY" "${SYNTH[@]}" --compile unet --warmup 2 --json-out "$OUT/synth_compiled.json"
} 2>&1 | tee "$OUT/all.log"
