#!/usr/bin/env bash
# Stage-2 throughput on a lent H100/H200 (about 5-6 minutes including torch.compile).
#
# Runs bench/synth.py twice on the SD1.5 layout (random weights, fp16, SDPA, channels-last), 256x256,
# T=70 with lambda=0.5 (35 denoising steps), batch 128, each run timing diffusers' img2img pipeline image
# by image on the same model as the baseline:
#   synth_eager     no compile
#   synth_compiled  torch.compile of the UNet and the VAE encoder/decoder (warm-up times = compile cost)
# Results: $OUT/synth_<variant>.json and .log, $OUT/env.txt.
#
# The GPU image has torch but not diffusers: carry `.whl` holding diffusers-0.42.1-py3-none-any.whl
# (python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers==0.42.1).
#   device run:  bash bench/gpu_synth.sh          (carry: [".whl"], timeout_s 540)
#   CPU check:   SYNTH_SMOKE=1 bash bench/gpu_synth.sh   (tiny model, same code paths, a few minutes)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/d4ir_bench}
mkdir -p "$OUT"
if [ -x .venv/bin/python ]; then PY=${PY:-.venv/bin/python}; else PY=${PY:-python3}; fi
export PYTHONUNBUFFERED=1

if ! "$PY" -c "import diffusers" 2>/dev/null; then
    if ls .whl/diffusers-*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 2
        export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
    else
        echo "diffusers is not installed and no .whl/diffusers-*.whl was carried" >&2
        exit 2
    fi
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}

if [ "${SYNTH_SMOKE:-0}" = 1 ]; then
    COMMON=(--model tiny --device cpu --dtype float32 --size 64 --steps 20 --strength 0.5
            --batch 4 --n-images 4 --baseline-images 1)
    T_EAGER=300; T_COMPILED=600
else
    COMMON=(--model sd15-layout --device cuda --dtype float16 --size 256 --steps 70 --strength 0.5
            --batch 128 --n-images 384 --baseline-images 8 --vae-batch 32)
    T_EAGER=150; T_COMPILED=330
fi

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
    "$PY" -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

status=0
run() {
    local name=$1 limit=$2
    shift 2
    echo "=== $name"
    timeout "$limit" "$PY" bench/synth.py "${COMMON[@]}" "$@" --json-out "$OUT/synth_$name.json" \
        2>&1 | grep -v -e "low_cpu_mem_usage" -e "pip install accelerate" -e '^```' | tee "$OUT/synth_$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || { echo "=== $name failed (exit $rc; 124 = timed out after $limit s)"; status=1; }
}

run eager "$T_EAGER" --channels-last --warmup 1
run compiled "$T_COMPILED" --channels-last --compile all --warmup 2
exit $status
