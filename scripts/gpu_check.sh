#!/usr/bin/env bash
# Everything a lent CUDA machine checks, written under $OUT. Sections (all by default; each fits in
# one device call):
#   kernels      real Triton compilation and GPU correctness of every kernel (the tests marked
#                gpu), and the LUT, integer-op and KV tables;
#   lowrank_int  the low-rank (BERT-base, rotary SmolLM2 shape) and integer-only MiniLM forward
#                tables, their goal ratios merged into $OUT/lowrank_int_gpu.json.
# Run: OUT=bench/out bash scripts/gpu_check.sh [kernels] [lowrank_int]
set -u
export PYTHONPATH=$PWD TRITON_INTERPRET=0
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
sections=${*:-kernels lowrank_int}
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"

if [[ " $sections " == *" kernels "* ]]; then
  python3 -m pytest -q -m gpu tests/integer tests/lowbit 2>&1 | tail -15 | tee "$OUT/gpu-tests-integer-lowbit.txt"
  python3 bench/lut_gpu.py --markdown "$OUT/lut-gpu.md" 2>&1 | tail -20
  python3 -m pytest -q -m gpu tests/kv tests/hf tests/ops tests/codegen tests/aot 2>&1 | tail -15 | tee "$OUT/gpu-tests-kv-ops-codegen.txt"
  python3 bench/kv_gpu.py --markdown "$OUT/kv-gpu.md" 2>&1 | tail -30
fi

if [[ " $sections " == *" lowrank_int "* ]]; then
  python3 -m pytest -q -m gpu tests/ops/test_lowrank_ops.py 2>&1 | tail -5 | tee "$OUT/gpu-tests-lowrank.txt"
  python3 bench/lowrank_gpu.py --seqs 128 512 --markdown "$OUT/lowrank-gpu.md" --json "$OUT/lowrank-gpu.json" 2>&1 | tail -12
  python3 bench/intops_gpu.py --seqs 128 --markdown "$OUT/intops-gpu.md" --json "$OUT/intops-gpu.json" 2>&1 | tail -12
  python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
parts = [json.loads((out / name).read_text()) for name in ("lowrank-gpu.json", "intops-gpu.json")
         if (out / name).exists()]
merged = {k: v for part in parts for k, v in part.items()}
(out / "lowrank_int_gpu.json").write_text(json.dumps(merged, indent=2) + "\n")
print(merged)
PY
fi
