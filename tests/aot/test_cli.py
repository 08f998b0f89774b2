"""The command line: ``python -m fxpress`` and the ``fxpress`` console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fxpress.cli import CliError, parse_option, parse_spec

ROOT = Path(__file__).resolve().parents[2]


def fxpress_cli(*args: str, script: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [shutil.which("fxpress", path=str(Path(sys.executable).parent))] if script else \
        [sys.executable, "-m", "fxpress"]
    return subprocess.run([*command, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def test_compile_inspect_run(tmp_path):
    out = tmp_path / "mlp"
    done = fxpress_cli("compile", "tests.aot.models:mlp", "-o", str(out), "--input", "float32[batch=3,16]",
                       "--option", "target=cpu")
    assert done.returncode == 0, done.stderr
    assert "export" in done.stderr and "capture and passes" in done.stderr  # the progress lines
    shown = fxpress_cli("inspect", str(out), "--graph")
    assert shown.returncode == 0, shown.stderr
    for part in ("every file matches meta.json", "torch " + torch.__version__, "inputs:", "args[0]: float32[",
                 "passes:", "memory plan:", "kernels:", "# ---- graph.txt"):
        assert part in shown.stdout, part
    (symbol,) = json.loads((out / "meta.json").read_text())["symbols"]  # the batch dimension
    ran = fxpress_cli("run", str(out), "--size", f"{symbol}=7")
    assert ran.returncode == 0, ran.stderr
    assert "output 0: float32[7, 8]" in ran.stdout


def test_console_script_and_factory_with_inputs(tmp_path):
    if shutil.which("fxpress", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("fxpress is not installed as a package here (pip install -e .)")
    out = tmp_path / "mlp"
    done = fxpress_cli("compile", "tests.aot.models:mlp_with_inputs", "-o", str(out), script=True)
    assert done.returncode == 0, done.stderr
    ran = fxpress_cli("run", str(out), "--repeat", "3", script=True)
    assert "output 0: float32[3, 8]" in ran.stdout and "3 call(s)" in ran.stdout


def test_errors_are_one_line_and_exit_2(tmp_path):
    done = fxpress_cli("compile", "tests.aot.models:mlp", "-o", str(tmp_path / "x"), "--input", "float32(3,16)")
    assert done.returncode == 2 and "expected dtype[d0,d1,...]" in done.stderr and "Traceback" not in done.stderr
    done = fxpress_cli("run", str(tmp_path / "missing"))
    assert done.returncode == 2 and "no such artifact folder" in done.stderr


def test_spec_and_option_parsing():
    assert parse_spec("int64[2, seq=16]") == (torch.int64, [2, 16], {1: ("seq", 16)})
    with pytest.raises(CliError, match="neither N nor name=N"):
        parse_spec("float32[2,x]")
    assert parse_option("lut_max_rows=4") == ("lut_max_rows", 4)
    assert parse_option("target=triton") == ("target", "triton")
    key, policy = parse_option("kv=KIVI(bits=2, residual=64)")
    assert key == "kv" and (policy.bits, policy.residual) == (2, 64)
    with pytest.raises(CliError, match="is not one of"):
        parse_option("kv=exec('x')")
    with pytest.raises(CliError, match="is not a literal"):
        parse_option("kv=os.system('x')")
