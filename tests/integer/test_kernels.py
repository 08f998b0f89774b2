"""Integer kernels bit for bit: Triton kernel == C++ kernel == torch reference == NumPy reference.

Elementwise ops are checked exhaustively over all 256 int8 codes at several scales; softmax and
LayerNorm over random rows and the extremes (all equal, -128/127, every position masked, rows far
longer than a block).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

import fxpress  # noqa: F401  (registers the ops)
from fxpress.integer import constants
from fxpress.integer.config import IntegerError
from tests.integer import numpy_reference as npref

ops = torch.ops.fxpress
ALL_CODES = torch.arange(-128, 128, dtype=torch.int32).to(torch.int8)
# Scales from far below MIN_SCALE (coarsened inputs) to coarse ones.
SCALES = [1e-6, 3e-5, 0.003, 0.02, 0.0625, 0.11, 0.5, 2.0]


@dataclass(frozen=True)
class Kernels:
    module: Any  # the launchers
    device: str  # where their tensors live


@pytest.fixture(params=["interpreter", pytest.param("cuda", marks=pytest.mark.gpu), "cpp"])
def kernel(request, monkeypatch):
    """Each target's integer kernels: Triton's (in Triton's interpreter on CPU, and on a CUDA device
    when there is one) and the cpp target's."""
    if request.param == "cpp":
        from fxpress.ops.cpp import integer

        return Kernels(integer, "cpu")
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if request.param == "interpreter":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    from fxpress.ops.kernels import integer

    return Kernels(integer, "cuda" if request.param == "cuda" else "cpu")


def _run(launcher, device, q, *args, dtype):
    q = q.to(device)
    out = torch.empty(q.shape, dtype=dtype, device=device)
    launcher(q, *[a.to(device) if isinstance(a, torch.Tensor) else a for a in args], out)
    return out.cpu()


@pytest.mark.parametrize("method", ["ibert", "shift"])
@pytest.mark.parametrize("scale", SCALES)
def test_gelu_every_int8_code(method, scale, kernel):
    q = ALL_CODES.reshape(2, 128)
    s = torch.tensor([scale])
    max_q, exp_bits = (23 if method == "shift" else 30), 22
    reference = ops.int_gelu(q, s, method, max_q, exp_bits)
    table = constants.gelu_constants(s, method, exp_bits, max_q).numpy()
    np.testing.assert_array_equal(reference.numpy(), npref.gelu(q.numpy(), table, method))
    assert torch.equal(_run(kernel.module.int_gelu, kernel.device, q, s, method, max_q, exp_bits, dtype=torch.int32), reference)


@pytest.mark.parametrize("method", ["ibert", "shift"])
def test_gelu_output_scale_kernel(method, device):  # a Triton kernel only: the cpp target runs the reference
    from fxpress.ops.kernels import integer

    scale = torch.tensor(SCALES + [7e-5, 0.3, 1.0]).reshape(-1, 1)
    out = torch.empty_like(scale, device=device)
    integer.int_gelu_scale(scale.to(device), method, out)
    assert torch.equal(out.cpu(), ops.int_gelu_scale(scale, method))


@pytest.mark.parametrize("method", ["ibert", "shift"])
def test_gelu_per_row_scales_and_one_row_of_all_codes(method, kernel):
    q = ALL_CODES[torch.randperm(256, generator=torch.Generator().manual_seed(0))].reshape(1, 256).repeat(len(SCALES), 1)
    s = torch.tensor(SCALES).reshape(-1, 1)
    reference = ops.int_gelu(q, s, method, 23, 22)
    table = constants.gelu_constants(s, method, 22, 23).numpy()
    np.testing.assert_array_equal(reference.numpy(), npref.gelu(q.numpy(), table, method))
    assert torch.equal(_run(kernel.module.int_gelu, kernel.device, q, s, method, 23, 22, dtype=torch.int32), reference)


def _softmax_rows(width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(-127, 128, (6, width), generator=g, dtype=torch.int32)
    rows[1] = 17  # all equal
    rows[2, ::2], rows[2, 1::2] = -127, 127  # the extremes
    rows[3] = -128  # every position masked: uniform, like eager softmax of equal values
    rows[4, : width // 2] = -128  # half masked
    rows[5] = torch.randint(-3, 3, (width,), generator=g)  # nearly flat
    return rows.to(torch.int8)


@pytest.mark.parametrize("method,max_q", [("ibert", 30), ("shift", 15), ("ibert", 4)])
@pytest.mark.parametrize("width", [1, 7, 128, 3000])
def test_softmax_random_and_extreme_rows(method, max_q, width, kernel):
    q = _softmax_rows(width, seed=width)
    for scale in (torch.tensor([0.09]), torch.tensor(SCALES[:6]).reshape(-1, 1)):
        reference = ops.int_softmax(q, scale, method, max_q, 15, 8)
        table = constants.softmax_constants(scale, method, 15, max_q).numpy()
        np.testing.assert_array_equal(reference.numpy(), npref.softmax(q.numpy(), table, method == "ibert", 8))
        out = _run(kernel.module.int_softmax, kernel.device, q, scale, method, max_q, 15, 8, dtype=torch.uint8)
        assert torch.equal(out, reference)
    assert int(reference[3].sum()) == pytest.approx(256, abs=width)  # the masked row is uniform


def test_softmax_very_long_row_and_wide_output(kernel):
    q = torch.randint(-127, 128, (2, 40000), generator=torch.Generator().manual_seed(1), dtype=torch.int32).to(torch.int8)
    scale = torch.tensor([0.05])
    reference = ops.int_softmax(q, scale, "ibert", 30, 15, 12)
    assert reference.dtype == torch.int16
    table = constants.softmax_constants(scale, "ibert", 15, 30).numpy()
    np.testing.assert_array_equal(reference.numpy(), npref.softmax(q.numpy(), table, True, 12))
    assert torch.equal(_run(kernel.module.int_softmax, kernel.device, q, scale, "ibert", 30, 15, 12, dtype=torch.int16), reference)


@pytest.mark.parametrize("method,max_q", [("ibert", 30), ("shift", 15)])
@pytest.mark.parametrize("width,out_bits,dtype", [(1, 8, torch.float32), (7, 8, torch.float32),
                                                  (130, 8, torch.float16), (3000, 12, torch.float32)])
def test_dynamic_softmax_is_row_scale_quantise_softmax(method, max_q, width, out_bits, dtype, kernel):
    """int_softmax_dynamic == int_row_scale, int_quantize and int_softmax of the same float rows,
    bit for bit: masked positions, a row masked everywhere, a row of zeros, ragged tails, fp16."""
    x = (torch.randn(37, width, generator=torch.Generator().manual_seed(width)) * 4).to(dtype)
    x[0, : max(width // 3, 1)] = float("-inf")
    x[1] = torch.finfo(dtype).min  # every position masked
    x[2] = 0.0
    scale = ops.int_row_scale(x, True, 8)
    composed = ops.int_softmax(ops.int_quantize(x, scale, True, 8), scale, method, max_q, 15, out_bits)
    reference = ops.int_softmax_dynamic(x, method, max_q, 15, out_bits)
    assert torch.equal(reference, composed)
    out = _run(kernel.module.int_softmax_dynamic, kernel.device, x, method, max_q, 15, out_bits, dtype=composed.dtype)
    assert torch.equal(out, reference)


def _norm_rows(width: int, dtype: torch.dtype, bound: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(-bound, bound, (5, width), generator=g, dtype=torch.int64)
    rows[1] = 3  # all equal: variance 0
    rows[2, ::2], rows[2, 1::2] = -bound, bound - 1
    rows[3, 0] = bound - 1  # one outlier
    return rows.to(dtype)


@pytest.mark.parametrize("width,dtype,in_bits", [(1, torch.int8, 7), (384, torch.int8, 7), (3000, torch.int8, 7),
                                                 (16384, torch.int8, 7), (384, torch.int32, 24), (768, torch.int32, 22)])
def test_layer_norm_random_and_extreme_rows(width, dtype, in_bits, kernel):
    q = _norm_rows(width, dtype, 128 if dtype == torch.int8 else 2 ** in_bits, seed=width)
    g = torch.Generator().manual_seed(0)
    out_shift, bias_codes, _ = constants.layer_norm_affine(torch.rand(width, generator=g) + 0.1,
                                                           torch.randn(width, generator=g), width)
    in_shift, var_shift = constants.layer_norm_shifts(width, in_bits)
    reference = ops.int_layer_norm(q, bias_codes, in_shift, var_shift, out_shift)
    expected = npref.layer_norm(q.numpy(), bias_codes.numpy(), in_shift, var_shift, out_shift)
    np.testing.assert_array_equal(reference.numpy(), expected)
    out = _run(kernel.module.int_layer_norm, kernel.device, q, bias_codes, in_shift, var_shift, out_shift, dtype=torch.int32)
    assert torch.equal(out, reference)


def test_newton_square_root_is_the_exact_floor_at_least_one():
    from fxpress.integer.arith import isqrt

    v = torch.cat([torch.arange(0, 5000), torch.randint(0, 2 ** 31 - 1, (5000,)), torch.tensor([2 ** 31 - 1])])
    np.testing.assert_array_equal(isqrt(v).numpy(), np.maximum(npref.isqrt(v.numpy()), 1))


@pytest.mark.parametrize("masked,bits", [(False, 8), (True, 8), (False, 12), (False, 22)])
def test_quantize_matches_reference(masked, bits, kernel):
    x = torch.randn(7, 301, generator=torch.Generator().manual_seed(2)) * 4
    if masked:
        x[0, :5] = float("-inf")
        x[1] = torch.finfo(torch.float32).min
    x[2] = 0.0
    scale = ops.int_row_scale(x, masked, bits)
    row_scale = torch.empty(scale.shape, device=kernel.device)
    kernel.module.int_row_scale(x.to(kernel.device), masked, bits, row_scale)
    assert torch.equal(row_scale.cpu(), scale)
    reference = ops.int_quantize(x, scale, masked, bits)
    dtype = torch.int8 if bits == 8 else torch.int32
    assert reference.dtype == dtype
    assert torch.equal(_run(kernel.module.int_quantize, kernel.device, x, scale, masked, bits, dtype=dtype), reference)
    limit = 2 ** (bits - 1) - 1
    assert int(reference.min()) == (-128 if masked else -limit) and int(reference.max()) == limit
    unmasked = reference[3:].double() * scale[3:]
    assert (unmasked - x[3:]).abs().max() <= scale[3:].max() / 2 + 1e-6


@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan"), float("inf")])
def test_invalid_scales_are_refused(bad):
    q = ALL_CODES.reshape(1, 256)
    with pytest.raises(IntegerError, match="finite and positive"):
        ops.int_softmax(q, torch.tensor([bad]), "ibert", 30, 15, 8)
    with pytest.raises(IntegerError, match="finite and positive"):
        ops.int_gelu(q, torch.tensor([bad]), "shift", 23, 22)


def test_invalid_shapes_and_parameters_are_refused():
    q = ALL_CODES.reshape(2, 128)
    with pytest.raises(IntegerError, match="one per row"):
        ops.int_softmax(q, torch.ones(3, 1), "ibert", 30, 15, 8)
    with pytest.raises(IntegerError, match="int8 codes"):
        ops.int_softmax(q.to(torch.int32), torch.ones(1), "ibert", 30, 15, 8)
    with pytest.raises(IntegerError, match="method"):
        ops.int_gelu(q, torch.ones(1), "cubic", 23, 22)
    with pytest.raises(IntegerError, match="rows must be shorter"):
        ops.int_softmax(torch.zeros(1, 70000, dtype=torch.int8), torch.ones(1), "ibert", 30, 15, 8)
    with pytest.raises(IntegerError, match="bits=12 is invalid"):
        ops.int_quantize(torch.zeros(2, 3), torch.ones(1), True, 12)
    with pytest.raises(IntegerError, match="out_shift"):
        ops.int_layer_norm(q, torch.zeros(128, dtype=torch.int32), 0, 0, 40)
    with pytest.raises(IntegerError, match="nonzero"):
        constants.layer_norm_affine(torch.tensor([1.0, 0.0]), None, 2)
    with pytest.raises(IntegerError, match="16384"):
        constants.layer_norm_shifts(20000, 7)


@pytest.mark.parametrize("field,value", [("softmax_bits", 1), ("softmax_bits", 16), ("softmax_exp_bits", 25),
                                         ("gelu_exp_bits", 30), ("max_q", 0), ("max_q", 31), ("max_q", 2.5),
                                         ("method", "tvm"), ("layer_norm_input_bits", 7), ("layer_norm_input_bits", 23), ("ops", ("softmax", "silu")), ("calibration", {"a": 1})])
def test_invalid_options_name_the_field_and_range(field, value):
    with pytest.raises(IntegerError, match=field):
        fxpress.IntegerOnly(**{field: value})


@pytest.mark.parametrize("bad", [0.0, float("nan")])
def test_cpp_kernels_refuse_invalid_scales(bad):
    from fxpress.native import build
    from fxpress.ops.cpp import integer

    if build.compiler_refusal() is not None:
        pytest.skip("no working C++ compiler")
    q = ALL_CODES.reshape(1, 256)
    with pytest.raises(IntegerError, match="finite and positive"):
        integer.int_softmax(q, torch.tensor([bad]), "ibert", 30, 15, 8, torch.empty(1, 256, dtype=torch.uint8))
    with pytest.raises(IntegerError, match="finite and positive"):
        integer.int_gelu(q, torch.tensor([bad]), "shift", 23, 22, torch.empty(1, 256, dtype=torch.int32))
