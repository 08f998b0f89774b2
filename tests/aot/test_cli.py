"""The command line: ``python -m fxpress`` and the ``fxpress`` console script."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fxpress
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
    for part in ("every file matches meta.json", "torch " + torch.__version__, "inputs:", "args[0]: float32[batch, 16]",
                 "example sizes: {'batch': 3}", "passes:", "memory plan:", "kernels:", "# ---- graph.txt"):
        assert part in shown.stdout, part
    ran = fxpress_cli("run", str(out), "--size", "batch=7", "--repeat", "2")
    assert ran.returncode == 0, ran.stderr
    assert "output 0: float32[7, 8]" in ran.stdout and re.search(r"2 call\(s\): first [\d.]+ ms, median", ran.stdout)
    (symbol,) = json.loads((out / "meta.json").read_text())["symbols"]  # the symbol is understood too
    assert fxpress_cli("run", str(out), "--size", f"{symbol}=5").stdout.startswith("output 0: float32[5, 8]")
    wrong = fxpress_cli("run", str(out), "--size", "seq=5")
    assert wrong.returncode == 2 and "NAME one of ['batch']" in wrong.stderr


def test_version_and_help_answer_without_importing_torch():
    done = fxpress_cli("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"fxpress {fxpress.__version__}"
    probe = ("import sys; from fxpress.cli import main\n"
             "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
             "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.stdout.strip().endswith("False"), done.stdout + done.stderr
    assert "compile" in done.stdout and "inspect" in done.stdout


def test_run_feeds_a_kv_artifact_positions_from_zero(tmp_path):
    """A decode step with a KIVI-compressed StaticCache: ``run`` feeds cache_position 0 (a new
    sequence), not a random position past the cache."""
    out = tmp_path / "step"
    done = fxpress_cli("compile", "tests.aot.models:tiny_llama_step", "-o", str(out),
                       "--option", "kv=KIVI(bits=4, group_size=16, residual=16)")
    assert done.returncode == 0, done.stderr
    assert "KV state:" in fxpress_cli("inspect", str(out)).stdout
    ran = fxpress_cli("run", str(out), "--repeat", "3")
    assert ran.returncode == 0, ran.stderr
    assert "output 0: float32[1, 1, " in ran.stdout and "non-finite" not in ran.stdout


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
    assert parse_spec("int64[2, seq=16]") == (torch.int64, [2, 16], {1: ("seq", 16, None)})
    assert parse_spec("int64[2, seq=16:512]") == (torch.int64, [2, 16], {1: ("seq", 16, 512)})
    for wrong in ("float32[2,x]", "float32[2,16:512]", "float32[2,seq=16:]"):
        with pytest.raises(CliError, match="neither N, name=N nor name=N:MAX"):
            parse_spec(wrong)
    assert parse_option("lut_max_rows=4") == ("lut_max_rows", 4)
    assert parse_option("target=triton") == ("target", "triton")
    key, policy = parse_option("kv=KIVI(bits=2, residual=64)")
    assert key == "kv" and (policy.bits, policy.residual) == (2, 64)
    _, policy = parse_option("kv=ThinKV(ratio=0.5, kivi=KIVI(bits=2))")
    assert policy.ratio == 0.5 and policy.kivi.bits == 2
    with pytest.raises(CliError, match="is not one of"):
        parse_option("kv=ThinKV(kivi=exec('x'))")
    with pytest.raises(CliError, match="is not one of"):
        parse_option("kv=exec('x')")
    with pytest.raises(CliError, match="is not a literal"):
        parse_option("kv=os.system('x')")
