#!/usr/bin/env bash
# `make gpu-check`: every GPU check in order, each step's outcome printed, the exit status 1 if
# any step failed. Where CUDA is absent it says so and exits 0.
#   PY       the interpreter (default .venv/bin/python; e.g. python3 where torch is installed)
#   STEP_S   a limit in seconds for each step (default 900)
set -uo pipefail
PY=${PY:-.venv/bin/python}
STEP_S=${STEP_S:-900}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)"; then
  echo "gpu-check: no CUDA device here; the GPU checks were skipped"
  exit 0
fi
failed=0
step() {
  echo "== $*"
  local t0=$SECONDS
  timeout "$STEP_S" "$@"
  local rc=$?
  echo "== rc=$rc in $((SECONDS - t0)) s: $*"
  [ "$rc" = 0 ] || failed=1
}
step nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
step "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
# bf16 parity with transformers for the three families, the NCCL dispatch path, and the routed
# experts' paths (torch._grouped_mm included) against a float64 reference
step "$PY" -m pytest -q -p no:cacheprovider tests/gpu tests/engine/test_experts.py \
  -k "not kernels_are_built"
# engine speed on the GPU against transformers: bf16 (grouped experts, then without), fp32
step "$PY" -m bench.offline --device cuda --dtype bfloat16 --arch qwen3_moe,deepseek_v3,mixtral
step env MOE_GROUPED_MM=0 "$PY" -m bench.offline --device cuda --dtype bfloat16 \
  --arch qwen3_moe,deepseek_v3
step "$PY" -m bench.offline --device cuda --arch qwen3_moe,deepseek_v3
# the served cluster on the GPU (1 prefill + 1 decode rank sharing it) against the offline engine
step "$PY" -m bench.serve --device cuda --dtype bfloat16 --gang-size 1 --rank-threads 1 \
  --streams 1,32,128 --new-tokens 128
exit $failed
