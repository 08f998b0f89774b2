"""Progress bars: drawn on a terminal for the long steps, silent elsewhere or when turned off."""

from __future__ import annotations

import io

import torch

import fxpress
from fxpress.core.progress import progress, stage_bar
from tests.tiny_models import tiny_llama


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_no_bar_when_standard_error_is_not_a_terminal():
    items = [1, 2, 3]
    assert progress(items, "anything") is items and stage_bar("anything", 3) is None


def test_a_bar_on_a_terminal_unless_turned_off(monkeypatch):
    screen = Terminal()
    monkeypatch.setattr("sys.stderr", screen)
    assert list(progress(range(4), "counting", total=4)) == [0, 1, 2, 3]
    assert "fxpress counting" in screen.getvalue()
    monkeypatch.setenv("FXPRESS_PROGRESS", "0")
    items = [1]
    assert progress(items, "counting") is items and stage_bar("counting", 2) is None


def test_quantize_svd_aot_compile_and_explain_show_their_bars(monkeypatch, tmp_path):
    screen = Terminal()
    monkeypatch.setattr("sys.stderr", screen)
    model = tiny_llama(layers=1).eval()
    fxpress.compress.quantize(model, bits=4, group_size=32)
    fxpress.compress.svd(model, rank_ratio=0.5, calibration=[torch.tensor([[1, 2, 3]])])
    fxpress.aot_compile(torch.nn.Linear(8, 4).eval(), (torch.randn(2, 8),), tmp_path / "linear", target="cpu")
    fxpress.explain(torch.nn.Linear(8, 4).eval(), torch.randn(2, 8))
    shown = screen.getvalue()
    for bar in ("fxpress quantize (rtn, 4-bit)", "fxpress svd calibration", "fxpress svd", "fxpress aot_compile",
                "fxpress explain"):
        assert bar in shown, bar
