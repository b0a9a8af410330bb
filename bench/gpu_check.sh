#!/usr/bin/env bash
# The GPU check of the speed issue, on a lent GPU machine with no network. The command carries
# .whl/ (this project's dependencies that the machine's image lacks, as wheels) and .gpu/ (data and
# weights), then: bench.gpu (CUDA against the CPU, one run), then the test suite, where every
# `--device auto` now means CUDA.
set -o pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export CLOTHING_DATA_DIR=$PWD/.gpu/data CLOTHING_BACKBONE_WEIGHTS=$PWD/.gpu/weights.pth
nvidia-smi -L
grep -o -E 'avx2|avx512f|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' '; nproc
python3 -c "import torch, torchvision, mlflow, optuna; print('torch', torch.__version__, 'torchvision', \
torchvision.__version__, 'mlflow', mlflow.__version__, 'optuna', optuna.__version__, 'cuda', torch.cuda.is_available())"
timeout "${BENCH_SECONDS:-270}" python3 -m bench.gpu 2>&1 | tee "$OUT/bench.log"
OMP_NUM_THREADS=2 timeout "${TEST_SECONDS:-200}" python3 -m pytest -q -n 8 -p no:cacheprovider -rfE 2>&1 \
    | tee "$OUT/tests.log" | tail -40
