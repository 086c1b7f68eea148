#!/usr/bin/env bash
# The GPU check, in one command: the CUDA tests (tests/test_cuda.py), then saelab's CUDA training
# throughput at d = 576, n = 32,768 and 131,072, k = 32, batch 4,096 and 32,768 (fp32, TF32, and
# train_sae end to end; benchmarks/gpu_throughput.py). A few minutes on one H200; each part is
# capped at 3.5 minutes. Logs and one JSON line per throughput figure go to OUT_DIR.
#
#   benchmarks/gpu_check.sh [OUT_DIR]          # default OUT_DIR: $OUT, else benchmarks/gpu_check_out
#   PYTHON=/path/to/python benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT_DIR=${1:-${OUT:-benchmarks/gpu_check_out}}
mkdir -p "$OUT_DIR"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA GPU'; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0), \
'x', torch.cuda.device_count())" || exit 1
# saelab's own dependencies (pyproject.toml) must be importable: on a bare GPU image that is
# typically simple-parsing (and its docstring-parser) to install first.
"$PY" -c "import saelab.train, saelab.data, saelab.sae, transformers" \
    || { echo "gpu_check: saelab or one of its dependencies does not import with $PY (see pyproject.toml)"; exit 1; }

timeout 210 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py 2>&1 | tee "$OUT_DIR/test_cuda.log"
tests=${PIPESTATUS[0]}
rm -f "$OUT_DIR/gpu_throughput.jsonl"
timeout 210 "$PY" benchmarks/gpu_throughput.py --json "$OUT_DIR/gpu_throughput.jsonl" 2>&1 \
    | tee "$OUT_DIR/gpu_throughput.log"
bench=${PIPESTATUS[0]}
echo "gpu_check: tests/test_cuda.py exit $tests, gpu_throughput.py exit $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
