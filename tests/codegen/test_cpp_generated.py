"""Generated C++ kernels of the cpp target (fused pointwise runs and row reductions) against eager:
ragged sizes, broadcasts, transposed and strided inputs, masks, symbolic sizes, many threads."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

import fxpress
from fxpress.native import build
from fxpress.runtime.wrapper_cache import load_wrapper

pytestmark = pytest.mark.skipif(build.compiler_refusal() is not None, reason="needs a C++ compiler")


def _run(fn, *args, dynamic=False):
    reports = []
    backend = fxpress.Backend(fxpress.Options(target="cpp", strict=True), on_report=reports.append)
    with torch.no_grad():
        return torch.compile(fn, backend=backend, dynamic=dynamic)(*args), fn(*args), reports[-1]


def _mask_fill(x, m):  # an HF-style additive mask from integer ids
    return torch.softmax(x + (1.0 - m[:, None, None, :].to(torch.float32)) * -1e9, -1)


CASES = {
    "chain": (lambda x, y: F.gelu(x * 2 + y) - torch.tanh(x) * torch.sigmoid(y), [(33, 17), (33, 17)]),
    "every_unary": (lambda x: torch.relu(x) + x.abs().sqrt() + torch.rsqrt(x * x + 1) + x.sin() * x.cos()
                    + F.silu(x) + F.gelu(x, approximate="tanh") + torch.exp(-x.abs()) + (x * x + 1).log()
                    - x.neg() / 3 + x.pow(2) + torch.sub(x, x, alpha=2), [(5, 4099)]),
    "broadcast": (lambda x, b: torch.relu(x + b) * torch.rsqrt(x * x + 1.0), [(4, 5, 6), (6,)]),
    "broadcast_middle": (lambda x, b: x * b, [(3, 7, 11), (3, 1, 11)]),
    "transposed": (lambda x, y: F.silu(x + y.t()), [(7, 129), (129, 7)]),
    "zero_dim": (lambda x, s: x * s + s, [(9, 10), ()]),
    "odd_size": (lambda x: torch.where(x > 0, torch.exp(-x), x.pow(2)), [(1031,)]),
    "compare_to_bool": (lambda x, y: (x > y) & (x < 1), [(3, 50), (3, 50)]),
    "softmax_with_prologue_epilogue": (lambda x: torch.softmax(x * 2 + 1, -1) * 3, [(6, 37)]),
    "softmax_row_longer_than_a_chunk": (lambda x: torch.softmax(x, -1), [(3, 5000)]),
    "layer_norm_affine": (lambda x, w, b: F.layer_norm(x + 1, (50,), w, b) * 2, [(4, 7, 50), (50,), (50,)]),
    "layer_norm_residual": (lambda x, r, w, b: F.layer_norm(x + r, (129,), w, b), [(2, 3, 129), (2, 3, 129), (129,),
                                                                                  (129,)]),
    "layer_norm_plain": (lambda x: F.layer_norm(x, (129,)), [(5, 129)]),
    "sum_keepdim": (lambda x: x.exp().sum(-1, keepdim=True), [(9, 33)]),
    "sum_dropped_dim": (lambda x: (x * 2).sum(-1), [(2, 9, 33)]),
    "mean_long_row": (lambda x: (x * x).mean(-1, keepdim=True), [(9, 1100)]),
    "amax": (lambda x: torch.amax(x, -1, keepdim=True), [(5, 13)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_generated_kernels_match_eager(case):
    fn, shapes = CASES[case]
    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(s, generator=gen) for s in shapes]
    actual, expected, report = _run(fn, *args)
    assert report.generated and not report.not_generated, report.not_generated
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_integer_mask_to_float_and_masked_softmax():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, 11, generator=gen)
    m = torch.ones(2, 11, dtype=torch.int64)
    m[1, 7:] = 0
    actual, expected, report = _run(_mask_fill, x, m)
    assert any("softmax" in name for name in report.generated)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    assert actual[1, ..., 7:].abs().max() == 0  # masked keys get exactly nothing


def test_gelu_at_its_edges():
    """erf is clamped at |x| = 4 and its quotient at 1, on |x| with x's sign put back: NaN stays
    NaN (through GELU's product with x), large and tiny inputs of both signs match eager."""
    x = torch.cat([torch.tensor([float("nan"), 0.0, -0.0, 1e-30, -1e-30, 3.99, 4.0, 4.01, -4.01, 6.0, -6.0,
                                 40.0, -40.0, 1e30, -1e30]), torch.randn(50) * 4])
    actual, expected, report = _run(F.gelu, x)
    assert report.generated
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_fully_masked_row_is_nan_as_in_eager():
    x = torch.full((2, 6), float("-inf"))
    x[0] = torch.arange(6.0)
    actual, expected, _ = _run(lambda t: torch.softmax(t, -1), x)
    torch.testing.assert_close(actual, expected, equal_nan=True)


def test_symbolic_sizes_one_library_for_all():
    fn = lambda x, b: F.layer_norm(x + b, (x.shape[-1],)) * 2  # noqa: E731
    for rows, width in ((3, 40), (5, 77)):
        x, b = torch.randn(rows, width), torch.randn(width)
        actual, expected, report = _run(fn, x, b, dynamic=True)
        assert report.generated
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_a_size_read_at_run_time_stays_torch_calls():
    fn = lambda x: torch.relu(x) * x.shape[0] + 1  # noqa: E731
    for rows in (3, 6):
        x = torch.randn(rows, 10)
        actual, expected, _ = _run(fn, x, dynamic=True)
        torch.testing.assert_close(actual, expected)


def _wrapper(fn, *args):
    """The generated wrapper of ``fn`` compiled for ``args``, loaded on its own."""
    report = fxpress.explain(fn, *args, target="cpp").graphs[0]
    assert report.generated
    return load_wrapper(report.wrapper, {}).call


@pytest.mark.parametrize("layout", ["transposed", "every_other_column", "sliced_rows"])
def test_inputs_laid_out_unlike_the_example_read_right(layout):
    """Strides are read per call: a tensor with the example's sizes but not its strides (an
    artifact called with a view) takes the general loop, not the unit-stride one."""
    gen = torch.Generator().manual_seed(3)
    pointwise = _wrapper(lambda x, y: F.gelu(x) * y + 1, torch.randn(6, 40), torch.randn(6, 40))
    norm = _wrapper(lambda x, y: torch.softmax(x + y, -1), torch.randn(6, 40), torch.randn(6, 40))
    base = {"transposed": torch.randn(40, 6, generator=gen).t(),
            "every_other_column": torch.randn(6, 80, generator=gen)[:, ::2],
            "sliced_rows": torch.randn(9, 40, generator=gen)[2:8]}[layout]
    y = torch.randn(6, 40, generator=gen)
    torch.testing.assert_close(pointwise([base, y])[0], F.gelu(base) * y + 1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm([base, y])[0], torch.softmax(base + y, -1), rtol=1e-5, atol=1e-6)


def test_kernels_of_one_structure_are_one_library():
    """The C++ names no node and bakes in no size: the twelve residual LayerNorms of a model are
    one library (and so are the same kernels of another graph, at other sizes)."""
    def blocks(x, m, w, b):
        for _ in range(3):
            x = F.layer_norm(x @ m + x, (24,), w, b)
        return x
    report = fxpress.explain(blocks, torch.randn(2, 5, 24), torch.randn(24, 24), torch.randn(24), torch.randn(24),
                             target="cpp").graphs[0]
    layer_norms = [re.search(r"native_kernel\(r'''(.*?)'''", source, re.S).group(1)
                   for name, source in report.generated.items() if "native_layer_norm" in name]
    assert len(layer_norms) == 3 and len(set(layer_norms)) == 1


def test_unsupported_dtype_stays_torch_calls_and_says_why():
    x = torch.randn(4, 8, dtype=torch.float64)
    actual, expected, report = _run(lambda t: torch.relu(t) + 1, x)
    assert not report.generated
    assert any("float32" in r for r in report.not_generated.values()), report.not_generated
    torch.testing.assert_close(actual, expected)


def test_many_threads_share_generated_kernels():
    def fn(x, w, b):
        return F.layer_norm(torch.relu(x) + x, (64,), w, b).softmax(-1)
    w, b = torch.randn(64), torch.randn(64)
    compiled = torch.compile(fn, backend=fxpress.backend(target="cpp", strict=True))
    inputs = [torch.randn(16, 64, generator=torch.Generator().manual_seed(i)) for i in range(32)]
    with torch.no_grad():
        compiled(inputs[0], w, b)
        with ThreadPoolExecutor(8) as pool:
            outputs = list(pool.map(lambda x: compiled(x, w, b), inputs))
        for x, out in zip(inputs, outputs):
            torch.testing.assert_close(out, fn(x, w, b), rtol=1e-5, atol=1e-6)
