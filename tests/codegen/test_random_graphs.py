"""Random programs of pointwise, reduction, view and matmul ops through the whole pipeline
(capture, passes, schedule, memory plan, generated wrapper and, on the triton target, generated
Triton kernels run by Triton's interpreter; on the cpp target, generated C++) against eager."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxpress
from fxpress.native.build import compiler_refusal

B, N = 3, 8
UNARY = {
    "relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "neg": torch.neg,
    "gelu": F.gelu, "silu": F.silu, "exp_small": lambda t: torch.exp(torch.tanh(t)),
    "softmax": lambda t: torch.softmax(t, -1), "layer_norm": lambda t: F.layer_norm(t, (N,)),
    "rms_norm": lambda t: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6),
    "row_sum": lambda t: t - t.sum(-1, keepdim=True) / N, "transpose_mm": lambda t: (t.t() @ t)[:B],
    "reshape": lambda t: t.reshape(N, B).t().contiguous().reshape(B, N), "scale": lambda t: t * 0.5,
    "to_double_and_back": lambda t: t.double().sin().float(),
}
WEIGHT = torch.randn(N, N, generator=torch.Generator().manual_seed(2)) / N  # a graph constant
BINARY = {"add": torch.add, "mul": torch.mul, "sub": torch.sub, "linear": lambda a, b: a @ WEIGHT + b}

ops = st.one_of(
    st.tuples(st.just("unary"), st.sampled_from(sorted(UNARY)), st.integers(0, 10)),
    st.tuples(st.just("binary"), st.sampled_from(sorted(BINARY)), st.tuples(st.integers(0, 10), st.integers(0, 10))),
)


def build(program):
    def fn(x, w):
        pool = [x, w]
        for kind, name, operands in program:
            if kind == "unary":
                pool.append(UNARY[name](pool[operands % len(pool)]))
            else:
                a, b = operands
                pool.append(BINARY[name](pool[a % len(pool)], pool[b % len(pool)]))
        return pool[-1], pool[len(pool) // 2]  # two outputs, one possibly mid-program
    return fn


@pytest.fixture(params=["cpu", "triton"])
def target(request, monkeypatch):
    if request.param == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # generated kernels in Triton's interpreter
    return request.param


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(program=st.lists(ops, min_size=1, max_size=10))
def test_random_program_matches_eager(target, program):
    _check(program, target)


# Fewer programs on the cpp target: each new kernel structure is a C++ build (about half a second).
@pytest.mark.skipif(compiler_refusal() is not None, reason="needs a C++ compiler")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=st.lists(ops, min_size=1, max_size=10))
def test_random_program_matches_eager_on_generated_cpp(program):
    _check(program, "cpp")


def _check(program, target):
    fn = build(program)
    x = torch.randn(B, N, generator=torch.Generator().manual_seed(0))
    w = torch.randn(B, N, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    with torch.no_grad():
        expected = fn(x, w)
        actual = torch.compile(fn, backend=fxpress.backend(target=target, strict=True), fullgraph=True)(x, w)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
