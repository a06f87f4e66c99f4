#!/usr/bin/env bash
# Every GPU measurement of stage 2 (and stage 3's distill step) in one call on a lent H100/H200, inside 9 minutes:
# bench/gpu_bench.py with its GPU defaults (SD1.5 layout, 256x256, T=70, lambda=0.5, no guidance), sections
#   sampler     ccd_sample fp16/bf16 x channels-last at batch 64, the best at 32 and 128, phase split  (~1 min)
#   baselines   diffusers' img2img pipeline image by image and batched                                 (~20 s)
#   profile     top 15 CUDA kernels of one batch -> $OUT/profile_kernels.txt                           (~15 s)
#   end_to_end  synth.worker.synthesize on 256 generated photos vs ccd_sample alone                    (~40 s)
#   compile     torch.compile of the UNet and the VAE decoder on the best variant                      (<= 200 s)
#   distill     bench/distill.py at paper settings, per deformable-conv implementation if present      (<= 110 s)
# Global budget 510 s (BUDGET=...), hard stop at 560 s (HARD_LIMIT=...). Extra arguments go to gpu_bench.py
# (e.g. `bash bench/gpu_all.sh --sections compile,distill --budget 300` for a rerun of two sections).
#
# The GPU image has torch and transformers but not diffusers/webdataset: carry `.whl` holding exactly these
# three pure-Python wheels, the versions of the project's .venv (6.4 MB):
#   diffusers-0.42.1-py3-none-any.whl  webdataset-1.0.2-py3-none-any.whl  braceexpand-0.1.7-py2.py3-none-any.whl
# made here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       diffusers==0.42.1 webdataset==1.0.2 braceexpand==0.1.7
#
#   device run: bash bench/gpu_all.sh          (carry [".whl"], timeout_s 600)
#   CPU check:  SMOKE=1 PY=.venv/bin/python bash bench/gpu_all.sh   (tiny model, every code path, ~1 min)
# Writes $OUT/env.txt, gpu_bench.json, gpu_bench.log, profile_kernels.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/d4ir_gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
if ! "$PY" -c "import diffusers, webdataset" 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "diffusers/webdataset are not installed and no .whl/ was carried (see the header of $0)" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.sm,power.limit --format=csv \
        2>/dev/null || echo "no nvidia-smi"
    "$PY" -m pip list 2>/dev/null | grep -i -E "^(torch|torchvision|diffusers|transformers|huggingface.hub|webdataset) "
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

ARGS=(--out "$OUT")
if [ "${SMOKE:-0}" = 1 ]; then ARGS+=(--smoke --threads "${THREADS:-1}"); fi
if [ -n "${BUDGET:-}" ]; then ARGS+=(--budget "$BUDGET"); fi
# gpu_bench.py writes its own full log ($OUT/gpu_bench.log); the console drops diffusers' repeated notices.
timeout -k 10 "${HARD_LIMIT:-560}" "$PY" bench/gpu_bench.py "${ARGS[@]}" "$@" 2>&1 \
    | grep --line-buffered -v -e "low_cpu_mem_usage" -e "pip install accelerate" -e "should be kept in float32"
rc=${PIPESTATUS[0]}
[ "$rc" = 0 ] || echo "gpu_bench.py exit $rc (124: killed at the hard limit; $OUT/gpu_bench.json holds every finished section)"
exit "$rc"
