#!/usr/bin/env bash
# The GPU check, in one command: the CUDA tests (tests/test_cuda.py), saelab's CUDA training
# throughput at d = 576, n = 32,768 and 131,072, k = 32, batch 4,096 and 32,768 (fp32, TF32, and
# train_sae end to end; benchmarks/gpu_throughput.py), then saelab side by side with sparsify on the
# GPU (benchmarks/compare_peers.py --device cuda: n = 32,768 and 131,072, batch 4,096, the same
# activations and batch order, AuxK active in most steps, TF32 GEMM bound measured in each round).
# Then the top CUDA kernels of a step
# with and without AuxK (compare_peers.py --profile), and last what AuxK adds to a step at 3-38 % of
# the latents dead (benchmarks/auxk_cost.py; AUXK_ARGS="--variant NAME=KNOB:VALUE" times settings of
# saelab.sae.kernels beside it). At most 12 minutes on one H200 (each part is capped: 150 + 150 +
# 240 + 90 + 90 s), about 6 in practice: where a command may run 10 minutes, split it with PARTS.
# Logs, the side-by-side table and one JSON line per throughput figure go to OUT_DIR.
#
#   benchmarks/gpu_check.sh [OUT_DIR]          # default OUT_DIR: $OUT, else benchmarks/gpu_check_out
#   PYTHON=/path/to/python benchmarks/gpu_check.sh
#   PARTS="peers profile" benchmarks/gpu_check.sh   # some parts only (default: tests throughput peers profile auxk)
#
# Offline: the GPU machine has no package index. What its image lacks (saelab's simple-parsing and
# docstring-parser; sparsify and the packages it imports that the image does not hold) is installed
# from the wheels in benchmarks/peers/gpu-wheels (pure Python, fetched for Python 3.12 with
# `pip download --no-deps --only-binary=:all: --python-version 3.12 -d benchmarks/peers/gpu-wheels
# eai-sparsify==1.3.3 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 natsort==8.4.0
# schedulefree==1.4.1 simple-parsing==0.1.9 docstring-parser==0.18.0`) into a folder on PYTHONPATH,
# never into the image's own environment.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT_DIR=${1:-${OUT:-benchmarks/gpu_check_out}}
PARTS=${PARTS:-tests throughput peers profile auxk}
mkdir -p "$OUT_DIR"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA GPU'; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0), \
'x', torch.cuda.device_count())" || exit 1
if ! "$PY" -c "import simple_parsing, sparsify" 2>/dev/null; then
    SITE=${TMPDIR:-/tmp}/saelab-gpu-site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        benchmarks/peers/gpu-wheels/*.whl || { echo "gpu_check: installing benchmarks/peers/gpu-wheels failed"; exit 1; }
    export PYTHONPATH="$PYTHONPATH:$SITE"  # after the image's packages: the wheels only fill gaps
fi
"$PY" -c "import saelab.train, saelab.data, saelab.sae, transformers" \
    || { echo "gpu_check: saelab or one of its dependencies does not import with $PY (see pyproject.toml)"; exit 1; }

wants() { [[ " $PARTS " == *" $1 "* ]]; }
status=0
note() { echo "gpu_check: $1 exit $2"; [ "$2" -eq 0 ] || status=1; }
if wants tests; then
    timeout 150 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_kernels.py \
        tests/test_tensors.py 2>&1 | tee "$OUT_DIR/test_cuda.log"
    note tests "${PIPESTATUS[0]}"
fi
if wants throughput; then
    rm -f "$OUT_DIR/gpu_throughput.jsonl"
    timeout 150 "$PY" benchmarks/gpu_throughput.py --json "$OUT_DIR/gpu_throughput.jsonl" 2>&1 \
        | tee "$OUT_DIR/gpu_throughput.log"
    note gpu_throughput.py "${PIPESTATUS[0]}"
fi
# sparsify runs with the same Python (its wheels are on PYTHONPATH). Random activations: the machine
# holds neither the LM's weights nor room to carry a harvested cache. Isotropic rows leave no latent
# dead for long, so the dead window is one batch: AuxK then acts in nearly every step, with 5-40 %
# of the latents dead, the range where its cost matters.
PEERS=(--device cuda --activations random --batch-size 4096 --eval-rows 16384 --threads 8 --gemm-repeats 50
       --workdir "${TMPDIR:-/tmp}/saelab-gpu-peers")
if wants peers; then
    timeout 240 "$PY" benchmarks/compare_peers.py "${PEERS[@]}" --libs saelab sparsify --peer-python "$PY" \
        --n 32768 131072 --rows 131072 --repeats 2 --dead-tokens 4096 --timeout 120 2>&1 \
        | tee "$OUT_DIR/compare_peers_cuda.md"
    note compare_peers.py "${PIPESTATUS[0]}"
fi
# The top CUDA kernels of one step without AuxK (step 2) and one with it (the last of 16; a
# 3-batch dead window leaves step 2 without dead latents).
if wants profile; then
    timeout 90 "$PY" benchmarks/compare_peers.py "${PEERS[@]}" --profile --n 32768 --rows 65536 \
        --dead-tokens 12288 --profile-rows 15 2>&1 | tee "$OUT_DIR/profile_cuda.txt"
    note "compare_peers.py --profile" "${PIPESTATUS[0]}"
fi
if wants auxk; then
    # shellcheck disable=SC2086  # AUXK_ARGS holds several arguments
    timeout 90 "$PY" benchmarks/auxk_cost.py --device cuda --cache random --n 8192 32768 131072 \
        --dead 0.03 0.1 0.24 0.38 --rounds 7 ${AUXK_ARGS:-} 2>&1 | tee "$OUT_DIR/auxk_cost_cuda.txt"
    note auxk_cost.py "${PIPESTATUS[0]}"
fi
exit $status
