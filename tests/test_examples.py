"""The examples run as a user would run them, and say what they promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.real_model
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script: str) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / script)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_quickstart():
    out = _run("quickstart.py")
    assert "MiniLM (8," in out and "max |fxpress - eager| = 0" in out
    assert "32 greedy tokens identical to eager: True" in out
    assert "Paris" in out and "fuse_rms_norm" in out


def test_custom_pass():
    out = _run("custom_pass.py")
    assert "gelu_to_tanh fired {'gelu(x) => gelu(x, tanh)': 6}" in out
    assert "max |approximate - eager|" in out
