"""Bit-plane weights with float16 scales (``BitPlaneWeight.with_scales``, ``compress.quantize``'s
default): fewer bytes, and every op and target computes in float32 from the stored values, so the
results equal those of the same scales widened to float32."""

from __future__ import annotations

import pytest
import torch

import fxpress
from fxpress import lowbit
from fxpress.native import build

ops = torch.ops.fxpress


def _pair(bits=4, group=64, n=40, k=200, method="rtn"):
    g = torch.Generator().manual_seed(bits * group + n)
    narrow = getattr(lowbit, method)(torch.randn(n, k, generator=g), bits, group).with_scales(torch.float16)
    wide = narrow.with_scales(torch.float32)
    return narrow, wide, torch.randn(3, k, generator=g), torch.randn(n, generator=g)


def test_float16_scales_halve_the_scale_bytes_and_round_each_scale_once():
    q = lowbit.rtn(torch.randn(40, 256, generator=torch.Generator().manual_seed(0)), 4, 128)
    narrow = q.with_scales(torch.float16)
    assert narrow.alpha.dtype == narrow.beta.dtype == torch.float16 and narrow.planes is q.planes
    assert q.nbytes() - narrow.nbytes() == 2 * (q.alpha.numel() + q.beta.numel())
    assert torch.equal(narrow.alpha, q.alpha.half()) and torch.equal(narrow.beta, q.beta.half())
    # 4-bit codes in groups of 128 with a float16 scale per bit-plane and an offset: 4.625 bits a weight
    assert 8 * narrow.nbytes() / (40 * 256) == 4 + (4 + 1) * 16 / 128
    torch.testing.assert_close(narrow.dequantize(), q.dequantize(), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("method", ["rtn", "bcq"])
@pytest.mark.parametrize("max_rows", [0, 16])
def test_ops_compute_in_float32_from_the_stored_scales(method, max_rows):
    narrow, wide, x, bias = _pair(method=method)
    assert torch.equal(narrow.dequantize(), wide.dequantize())
    for planes_op in (lambda q: ops.dequantize_planes(q.planes, q.alpha, q.beta, q.in_features, q.group_size),):
        got = planes_op(narrow)
        assert got.dtype == torch.float32 and torch.equal(got, planes_op(wide))
    run = lambda q: ops.lut_linear(x, q.planes, q.alpha, q.beta, bias, q.in_features, q.group_size,  # noqa: E731
                                   max_rows)
    assert torch.equal(run(narrow), run(wide))


@pytest.mark.skipif(build.compiler_refusal() is not None, reason="no working C++ compiler")
@pytest.mark.parametrize("rows", [1, 40])
def test_cpp_kernels_read_float16_scales(rows):
    from fxpress.ops.cpp import lut as cpp_lut

    narrow, wide, _, bias = _pair(n=70, k=300, group=96)
    x = torch.randn(rows, 300, generator=torch.Generator().manual_seed(rows))
    outs = []
    for q in (narrow, wide):
        out = torch.empty(rows, 70)
        outs.append(cpp_lut.lut_linear(x, q.planes, q.alpha, q.beta, bias, 300, 96, 16, out))
    assert torch.equal(outs[0], outs[1])


def test_quantize_stores_float16_scales_unless_asked_otherwise():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(96, 80), torch.nn.GELU(), torch.nn.Linear(80, 64)).eval()
    narrow = fxpress.compress.quantize(mlp, bits=4, group_size=32, skip=())
    wide = fxpress.compress.quantize(mlp, bits=4, group_size=32, skip=(), scale_dtype=torch.float32)
    assert narrow.model[0].alpha.dtype == torch.float16 and wide.model[0].alpha.dtype == torch.float32
    assert narrow.weight_bytes < wide.weight_bytes
    x = torch.randn(5, 96)
    with torch.no_grad():
        torch.testing.assert_close(narrow.model(x), wide.model(x), rtol=1e-2, atol=1e-2)
        compiled = torch.compile(narrow.model, backend="fxpress")
        torch.testing.assert_close(compiled(x), narrow.model(x), rtol=3e-3, atol=3e-3)


def test_scale_dtypes_outside_the_format_are_refused():
    q = lowbit.rtn(torch.randn(8, 64), 4, 32)
    with pytest.raises(lowbit.QuantizeError, match="scale dtype"):
        q.with_scales(torch.bfloat16)
    huge = lowbit.rtn(torch.randn(8, 64) * 1e6, 4, 32)
    with pytest.raises(lowbit.QuantizeError, match="float16"):
        huge.with_scales(torch.float16)
    with pytest.raises(lowbit.QuantizeError, match="alpha is torch.float64"):
        ops.lut_linear(torch.randn(2, 64), q.planes, q.alpha.double(), q.beta, None, 64, 32, 4)
    with pytest.raises(fxpress.compress.QuantizeError, match="scale dtype"):
        fxpress.compress.quantize(torch.nn.Sequential(torch.nn.Linear(64, 8)), skip=(), scale_dtype=torch.int8)
