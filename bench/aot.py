"""Ahead-of-time artifacts on CPU: compile time, artifact size, and the time to a first result when
loading an artifact in a fresh process vs compiling in it with torch.compile.

Models: all-MiniLM-L6-v2 (batch 8 x 128 tokens) and SmolLM2-135M's decode step (StaticCache of 64
tokens, 4-bit RTN weights through lut_matmul). Each "fresh process" figure is the wall time of a new
Python process that imports fxpress, gets the model ready (loads the artifact, or loads the
model's weights and compiles) and runs one call: what a serving process pays at start-up.

Run: ``python bench/aot.py [--json PATH]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Each script prints the seconds from its first line to the end of its first model call.
_LOAD = """
import time; start = time.perf_counter()
import sys, torch, fxpress
sys.path.insert(0, "bench"); import aot
_, inputs = aot.{name}(weights=False)
model = fxpress.load(sys.argv[1])
model(**inputs)
print(time.perf_counter() - start)
"""
_COMPILE = """
import time; start = time.perf_counter()
import sys, torch, fxpress
sys.path.insert(0, "bench"); import aot
model, inputs = aot.{name}()
with torch.no_grad():
    torch.compile(model, backend="fxpress")(**inputs)
print(time.perf_counter() - start)
"""


def minilm(weights: bool = True):
    """(model or None, inputs): all-MiniLM-L6-v2 on a batch of 8 x 128 tokens."""
    import torch

    from fxpress import workloads

    inputs = {"input_ids": torch.randint(0, 1000, (8, 128)), "attention_mask": torch.ones(8, 128, dtype=torch.long)}
    return (workloads.load_minilm()[0].eval() if weights else None), inputs


def smollm2_step(weights: bool = True):
    """(model or None, inputs): SmolLM2's decode step with 4-bit RTN weights and a 64-token StaticCache."""
    import torch

    import fxpress
    from fxpress import workloads

    inputs = {"input_ids": torch.tensor([[1]]), "cache_position": torch.tensor([0])}
    if not weights:
        return None, inputs
    sys.path.insert(0, str(ROOT / "examples"))
    from aot_artifact import decode_step

    return decode_step(fxpress.compress.quantize(workloads.load_smollm2()[0], bits=4).model, max_len=64), inputs


MODELS = {"MiniLM (8x128)": "minilm", "SmolLM2 decode step, 4-bit": "smollm2_step"}


def _fresh(script: str, *args: str) -> float:
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=ROOT,
                          check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    import torch

    import fxpress

    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    print("| model | aot_compile s | artifact MiB | fresh process: load + 1st call s | fresh process: "
          "torch.compile + 1st call s | ratio |")
    print("|---|---|---|---|---|---|")
    for name, factory in MODELS.items():
        model, inputs = globals()[factory]()
        folder = Path(tempfile.mkdtemp()) / "artifact"
        start = time.perf_counter()
        fxpress.aot_compile(model, (), folder, example_kwargs=inputs)
        compile_s = time.perf_counter() - start
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20
        load_s = _fresh(_LOAD.format(name=factory), str(folder))
        jit_s = _fresh(_COMPILE.format(name=factory))
        rows.append({"model": name, "aot_compile_s": compile_s, "artifact_mib": size, "load_first_call_s": load_s,
                     "compile_first_call_s": jit_s})
        print(f"| {name} | {compile_s:.1f} | {size:.1f} | {load_s:.1f} | {jit_s:.1f} | {jit_s / load_s:.1f}x |",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": "cpu", "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
