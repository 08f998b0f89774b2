"""The examples run as a user would run them, and say what they promise."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.real_model
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script: str, launcher: tuple[str, ...] = ()) -> str:
    done = subprocess.run([sys.executable, *launcher, str(EXAMPLES / script)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_quickstart():
    out = _run("quickstart.py")
    minilm = re.search(r"MiniLM \(8, \d+\): max \|fxpress - eager\| = ([0-9.e+-]+)", out)
    assert minilm and float(minilm.group(1)) <= 1e-5  # float rounding of the generated C++ kernels
    assert "32 greedy tokens identical to eager: True" in out
    assert "Paris" in out and "fuse_rms_norm" in out
    fused_vs_unfused = re.search(r"low-rank MiniLM: max \|fused - unfused\| = ([0-9.e+-]+)", out)
    # float rounding: the cpp kernels sum in another order than MKL (1.1e-5 with AVX-512's k slices)
    assert fused_vs_unfused and float(fused_vs_unfused.group(1)) <= 5e-5
    assert "lowrank_ffn: 6" in out and "lowrank_attention: 6" in out
    unfused, fused = map(float, re.search(r"unfused ([0-9.]+) MiB, fused ([0-9.]+) MiB", out).groups())
    assert fused < unfused


def test_custom_pass():
    out = _run("custom_pass.py")
    assert "gelu_to_tanh fired {'gelu(x) => gelu(x, tanh)': 6}" in out
    assert "max |approximate - eager|" in out


def test_kv_cache():
    out = _run("kv_cache.py")
    assert "KIVI-4 (G=32, R=128, sink=4)" in out and "greedy agreement 1.00" in out
    fractions = [float(f) for f in re.findall(r"\(([0-9.]+) of fp16\)", out)]
    assert len(fractions) == 4 and all(f < 0.65 for f in fractions)
    assert "'cache update -> sdpa => kv_attend': 60" in out and "identical to eager: True" in out


def test_integer_only():
    out = _run("integer_only.py")
    cosines = [float(c) for c in re.findall(r"mean ([0-9.]+), min", out)]
    assert len(cosines) == 3 and all(c >= 0.99 for c in cosines), out
    assert "encoder.layer.0.attention.self:softmax" in out and "fxpress.int_layer_norm.default" in out


def test_aot():
    out = _run("aot_artifact.py")
    assert "'fxpress.lut_linear.default': 210" in out and "'fxpress.kv_attend.default': 30" in out
    assert "identical to the in-process compile: True" in out


def test_tensor_parallel():
    out = _run("tensor_parallel.py", ("-m", "torch.distributed.run", "--nproc-per-node", "2"))
    for rank in (0, 1):
        lines = [line for line in out.splitlines() if line.startswith(f"rank {rank}: ")]
        text = "\n".join(lines)
        assert "dense, compiled: graphs left to eager 0" in text, out
        assert "'all_reduce': 30" in text and "'lut_linear': 210" in text, out
        assert "16 greedy tokens identical to the unsharded model: True" in text, out
        assert "greedy agreement with the unsharded 4-bit model 1.00" in text, out
        diffs = [float(d) for d in re.findall(r"max \|compiled - eager\| ([0-9.e+-]+)", text)]
        assert len(diffs) == 2 and max(diffs) <= 1e-3, text
