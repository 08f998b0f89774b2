#!/usr/bin/env bash
# Everything a lent CUDA machine checks, written under $OUT. Sections (all by default; each fits in
# one device call):
#   kernels      real Triton compilation and GPU correctness of every kernel (the tests marked
#                gpu), and the LUT, integer-op and KV tables;
#   lowrank_int  the low-rank models (BERT-base, rotary SmolLM2 shape; fp32 and fp16; 16 and 32
#                MiB blocks; replayed as CUDA graphs; a kernel profile of fused BERT-base) and the
#                integer-only MiniLM forward (plain and replayed, with a profile), the goal ratios
#                merged into $OUT/lowrank_int_gpu.json; the GPU tests of both and of CUDA graph replay.
#   lowrank_ops  the low-rank ops alone, each strategy against the unfused chain (not by default).
#   integer      the integer kernels' GPU tests and the integer-only MiniLM table alone, its ratios
#                in $OUT/intops-gpu.json (not by default: lowrank_int runs both).
# Run: OUT=bench/out bash scripts/gpu_check.sh [kernels] [lowrank_int] [lowrank_ops] [integer]
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
  parts=$(mktemp -d)  # the per-bench JSON, merged below ($OUT brings back at most 8 files)
  python3 -m pytest -q -m gpu tests/ops/test_lowrank_ops.py tests/runtime/test_cuda_graphs.py 2>&1 | tail -8 \
    | tee "$OUT/gpu-tests-lowrank-replay.txt"
  timeout 150 python3 bench/intops_gpu.py --seqs 128 --markdown "$OUT/intops-gpu.md" --json "$parts/intops-gpu.json" \
    --profile "$OUT/intops-profile.txt" 2>&1 | tail -12
  timeout 240 python3 bench/lowrank_gpu.py --seqs 512 --dtypes float32 float16 --blocks 16 32 --replay \
    --profile "$OUT/lowrank-profile.txt" --markdown "$OUT/lowrank-gpu.md" --json "$parts/lowrank-gpu.json" 2>&1 | tail -8
  python3 - "$parts" "$OUT" <<'PY'
import json, sys
from pathlib import Path
parts, out = Path(sys.argv[1]), Path(sys.argv[2])
merged = {k: v for name in ("lowrank-gpu.json", "intops-gpu.json") if (parts / name).exists()
          for k, v in json.loads((parts / name).read_text()).items()}
(out / "lowrank_int_gpu.json").write_text(json.dumps(merged, indent=2) + "\n")
print(merged)
PY
fi

if [[ " $sections " == *" integer "* ]]; then
  python3 -m pytest -q -m gpu tests/integer 2>&1 | tail -8 | tee "$OUT/gpu-tests-integer.txt"
  timeout 200 python3 bench/intops_gpu.py --seqs 128 --markdown "$OUT/intops-gpu.md" --json "$OUT/intops-gpu.json" \
    --profile "$OUT/intops-profile.txt" 2>&1 | tail -16
fi

if [[ " $sections " == *" lowrank_ops "* ]]; then
  python3 bench/lowrank_ops_gpu.py --markdown "$OUT/lowrank-ops-gpu.md" 2>&1 | tail -3
fi
