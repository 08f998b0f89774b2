"""The README's code runs as written: its Python blocks in order, in one namespace (a block uses
only names an earlier block defined), and its shell blocks line by line, on the real models."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.real_model
ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# Shell blocks that are not run here, each with the reason. Any other shell block runs.
NOT_RUN_HERE = {
    "bash scripts/setup.sh && .venv/bin/python examples/quickstart.py":
        "sets up a fresh environment: CI runs set-up on a clean clone; test_examples runs the quickstart",
    "bash scripts/setup.sh && .venv/bin/python -m pytest -q":
        "this very test suite: it is what CI runs (checked below)",
}


def blocks(language: str) -> list[tuple[int, str]]:
    """``(line, code)`` of each fenced block of ``language`` in the README."""
    found = []
    for match in re.finditer(rf"^```{language}\n(.*?)^```$", README.read_text(), flags=re.S | re.M):
        found.append((README.read_text()[:match.start()].count("\n") + 1, match.group(1)))
    return found


def test_every_block_is_code_or_text():
    """A fence without a language would be skipped silently: each block says what it is."""
    fenced = re.findall(r"^```(\w*)$", README.read_text(), flags=re.M)
    openers = fenced[::2]
    assert set(openers) <= {"python", "bash", "text"}, f"a block of unknown kind: {set(openers) - {'python', 'bash', 'text'}}"


def test_python_blocks_run_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the blocks write files (safetensors, artifacts) where they run
    namespace: dict = {"__name__": "readme"}
    python = blocks("python")
    assert len(python) >= 8
    for line, code in python:
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"the README's Python block at line {line} fails: {type(e).__name__}: {e}") from e
    # what the blocks promise, checked on what they left behind
    assert namespace["cache"].nbytes() > 0 and namespace["out"] is not None
    assert namespace["logits"].isfinite().all()
    assert (namespace["y"].last_hidden_state - namespace["model"](namespace["input_ids"]).last_hidden_state
            ).abs().max() < 1e-4
    assert sum(namespace["fxpress"].counters["my_pass"].values()) > 0


def test_shell_blocks_run(tmp_path):
    """Each line of the shell blocks, with the environment's ``fxpress`` on PATH, from a scratch
    folder (``examples.models`` found through PYTHONPATH)."""
    bin_dir = Path(sys.executable).parent
    if shutil.which("fxpress", path=str(bin_dir)) is None:
        pytest.skip("fxpress is not installed as a package here (pip install -e .)")
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(ROOT))
    ran = 0
    for line, code in blocks("bash"):
        for command in (c for c in code.splitlines() if c.strip() and not c.lstrip().startswith("#")):
            if command.strip() in NOT_RUN_HERE:
                continue
            done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, cwd=tmp_path,
                                  timeout=900)
            assert done.returncode == 0, f"README.md:{line}: {command}\n{done.stderr[-2000:]}"
            ran += 1
    assert ran >= 4


def test_the_readme_test_command_is_what_ci_runs():
    (_, two_commands), *_ = blocks("bash")
    test_command = next(c for c in two_commands.splitlines() if "pytest" in c)
    assert test_command.strip() in (ROOT / ".ci" / "run").read_text()
