#!/usr/bin/env bash
# Everything a lent CUDA machine checks in one call: real Triton compilation and GPU correctness of
# every kernel (the tests marked gpu), then the GPU benchmark tables, written under $OUT.
set -u
export PYTHONPATH=$PWD TRITON_INTERPRET=0
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -m gpu tests/integer tests/lowbit 2>&1 | tail -15 | tee "$OUT/gpu-tests-integer-lowbit.txt"
python3 bench/lut_gpu.py --markdown "$OUT/lut-gpu.md" 2>&1 | tail -20
python3 bench/intops_gpu.py --markdown "$OUT/intops-gpu.md" 2>&1 | tail -20
python3 -m pytest -q -m gpu tests/kv tests/hf tests/ops tests/codegen tests/aot 2>&1 | tail -15 | tee "$OUT/gpu-tests-kv-ops-codegen.txt"
python3 bench/kv_gpu.py --markdown "$OUT/kv-gpu.md" 2>&1 | tail -30
