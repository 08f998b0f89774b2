"""Linears against frozen weights on the cpp target (fxpress/ops/cpp/packed_gemm.py): MKL's GEMM on
a packed copy of the weight gives torch.mm's and torch.addmm's results bit for bit, over ragged
shapes and strided rows; the copy follows in-place weight updates; threads share it; operands it
cannot read run torch's GEMM. In a compiled graph only Linears with a constant weight and enough
rows run it, and a build without MKL says why in explain()."""

from __future__ import annotations

import threading

import pytest
import torch

import fxpress
from fxpress.codegen.targets.cpp import gemm
from fxpress.native import build
from fxpress.ops.cpp import packed_gemm
from fxpress.ops.cpp.packed_gemm import packed_linear

pytestmark = [
    pytest.mark.skipif(build.compiler_refusal() is not None, reason="no working C++ compiler"),
    pytest.mark.skipif(packed_gemm.mkl_refusal() is not None, reason="no MKL packed GEMM in this torch"),
]


@pytest.mark.parametrize("m,k,n", [(1, 8, 8), (17, 33, 50), (64, 384, 96), (300, 70, 129)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_torch_bit_for_bit(m, k, n, with_bias):
    g = torch.Generator().manual_seed(m * 100 + k + n)
    x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    out = torch.empty(m, n)
    assert packed_linear(x, w, out, bias=b if with_bias else None) is out
    expected = torch.addmm(b, x, w.t()) if with_bias else torch.mm(x, w.t())
    if m == 1:  # torch runs one row as a matrix-vector product, which sums in another order
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(out, expected)


def test_strided_rows_and_other_layouts():
    g = torch.Generator().manual_seed(1)
    wide, w = torch.randn(40, 100, generator=g), torch.randn(24, 60, generator=g)
    x = wide[:, 10:70]  # rows 100 floats apart
    out_wide = torch.zeros(40, 50)
    out = out_wide[:, 5:29]
    packed_linear(x, w, out)
    assert torch.equal(out, torch.mm(x, w.t())) and out_wide[:, :5].abs().sum() == 0
    columns = torch.randn(60, 40, generator=g).t()  # a column stride of 40: torch's GEMM runs it
    assert torch.equal(packed_linear(columns, w, torch.empty(40, 24)), torch.mm(columns, w.t()))


def test_the_packed_copy_follows_in_place_updates():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(32, 16, generator=g), torch.randn(8, 16, generator=g)
    out = torch.empty(32, 8)
    packed_linear(x, w, out)
    w.mul_(3)  # a new _version: the kept layout is stale
    packed_linear(x, w, out)
    assert torch.equal(out, torch.mm(x, w.t()))


def test_threads_share_the_packed_weight():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 128, generator=g)
    inputs = [torch.randn(96, 128, generator=g) for _ in range(4)]
    results, errors = [None] * 4, []

    def run(i):
        try:
            for _ in range(20):
                results[i] = packed_linear(inputs[i], w, torch.empty(96, 64))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(torch.equal(r, torch.mm(x, w.t())) for r, x in zip(results, inputs))


def _compiled(model, x):
    reports = []
    backend = fxpress.Backend(fxpress.Options(target="cpp", strict=True), on_report=reports.append)
    with torch.no_grad():
        return torch.compile(model, backend=backend)(x), model(x), reports[-1]


def test_a_compiled_linear_reads_the_packed_weight():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 96), torch.nn.GELU(), torch.nn.Linear(96, 48)).eval()
    actual, expected, report = _compiled(model, torch.randn(4, 16, 48))
    assert report.wrapper.count("packed_linear(") == 2
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_few_rows_and_computed_weights_stay_torch_gemms():
    model = torch.nn.Linear(32, 32).eval()
    _, _, report = _compiled(model, torch.randn(gemm.MIN_ROWS - 1, 32))
    assert "packed_linear(" not in report.wrapper

    def product(x, y):
        return x @ y  # the weight is an input of the graph, not a constant
    reports = []
    backend = fxpress.Backend(fxpress.Options(target="cpp"), on_report=reports.append)
    x, y = torch.randn(64, 32), torch.randn(32, 16)
    torch.testing.assert_close(torch.compile(product, backend=backend)(x, y), x @ y)
    assert "packed_linear(" not in reports[-1].wrapper


def test_an_addmm_with_a_full_bias_stays_atens_and_says_why():
    class Residual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(24, 32))

        def forward(self, x, c):
            return torch.addmm(c, x, self.weight.t())  # c: a bias per row and column

    model, x, c = Residual().eval(), torch.randn(40, 32), torch.randn(40, 24)
    reports = []
    backend = fxpress.Backend(fxpress.Options(target="cpp"), on_report=reports.append)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=backend)(x, c), model(x, c))
    assert "packed_linear(" not in reports[-1].wrapper
    assert "addmm's bias is not one row: its broadcast stays ATen's" in reports[-1].not_generated.values()


def test_without_mkl_the_gemm_stays_torchs_and_says_why(monkeypatch):
    monkeypatch.setattr(gemm, "mkl_refusal", lambda: "this torch build has no MKL")
    torch.manual_seed(1)
    model = torch.nn.Linear(32, 24).eval()
    actual, expected, report = _compiled(model, torch.randn(40, 32))
    assert "packed_linear(" not in report.wrapper
    assert "this torch build has no MKL" in report.not_generated.values()
    torch.testing.assert_close(actual, expected)
