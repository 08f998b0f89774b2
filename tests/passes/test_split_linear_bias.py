"""split_linear_bias (run by the cpp target before scheduling): a Linear whose output only pointwise
ops read runs as ``mm`` and its bias joins their generated kernel; other Linears keep ``addmm``;
the result matches eager; the pass leaves a graph it already rewrote unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import fxpress
from fxpress.ir.match import aten
from fxpress.native import build
from fxpress.passes.split_linear_bias import split_linear_bias

pytestmark = pytest.mark.skipif(build.compiler_refusal() is not None, reason="the cpp target needs a C++ compiler")


class Block(nn.Module):
    """An FFN with a residual (both Linears read only by pointwise ops) beside a Linear whose
    output a matmul reads."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down, self.side = nn.Linear(24, 40), nn.Linear(40, 24), nn.Linear(24, 24)

    def forward(self, x):
        h = x + self.down(F.gelu(self.up(x)))
        return h, self.side(x) @ h.transpose(-1, -2)


def _compile(model, x, target):
    reports = []
    backend = fxpress.Backend(fxpress.Options(target=target, strict=True), on_report=reports.append)
    with torch.no_grad():
        return torch.compile(model, backend=backend)(x), reports[-1]


def test_the_bias_joins_the_pointwise_kernel_that_reads_the_linear():
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(2, 7, 24)
    (h, s), report = _compile(model, x, "cpp")
    with torch.no_grad():
        eh, es = model(x)
    torch.testing.assert_close(h, eh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, es, rtol=1e-5, atol=1e-5)
    assert report.wrapper.count("aten.mm.out(") == 2, "up and down run without their bias"
    assert report.wrapper.count("aten.addmm.out(") == 1, "side's output goes to a matmul: it keeps addmm"
    assert any("add_gelu" in name for name in report.generated), sorted(report.generated)


def test_the_cpu_target_keeps_addmm():
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(2, 7, 24)
    _, report = _compile(model, x, "cpu")
    assert report.wrapper.count("aten.addmm.out(") == 3 and "aten.mm.out(" not in report.wrapper


def test_a_second_run_changes_nothing():
    graph = torch.fx.Graph()
    x, w, b = graph.placeholder("x"), graph.placeholder("w"), graph.placeholder("b")
    mm = graph.call_function(aten.addmm.default, (b, x, w))
    view = graph.call_function(aten.view.default, (mm, [2, 3, 5]))
    graph.output(graph.call_function(aten.gelu.default, (view,)))
    gm = torch.fx.GraphModule({}, graph)
    inputs = (torch.randn(6, 4), torch.randn(4, 5), torch.randn(5))
    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*inputs)
    expected = gm(*inputs)
    assert split_linear_bias(gm).modified
    assert not split_linear_bias(gm).modified
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets == [aten.mm.default, aten.view.default, aten.add.Tensor, aten.gelu.default]
    torch.testing.assert_close(gm(*inputs), expected)
