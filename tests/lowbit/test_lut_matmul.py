"""lut_linear against the dequantised reference, the lut_matmul pass, and generate() through it."""

from __future__ import annotations

import pytest
import torch

import fxpress
from fxpress import lowbit
from tests.tiny_models import tiny_llama, token_ids

ops = torch.ops.fxpress


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("method", ["rtn", "bcq"])
@pytest.mark.parametrize("n,k,group", [(37, 200, 64), (64, 96, 32), (5, 256, 128), (9, 80, 16)])
@pytest.mark.parametrize("rows", [1, 3, 20])
def test_lut_linear_equals_the_dequantised_reference(bits, method, n, k, group, rows):
    g = torch.Generator().manual_seed(n * k + rows)
    w, bias, x = torch.randn(n, k, generator=g), torch.randn(n, generator=g), torch.randn(rows, k, generator=g)
    q = getattr(lowbit, method)(w, bits, group)
    reference = x @ ops.dequantize_planes(q.planes, q.alpha, q.beta, k, group).T + bias
    for max_rows in (0, 64):  # dequantise-per-tile, and the table lookup
        out = ops.lut_linear(x, q.planes, q.alpha, q.beta, bias, k, group, max_rows)
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_the_table_path_is_not_a_dequantising_shortcut(monkeypatch):
    q = lowbit.rtn(torch.randn(8, 64), 3, 32)
    monkeypatch.setattr(lowbit, "dequantize", lambda *a: pytest.fail("the LUT path dequantised the weight"))
    ops.lut_linear(torch.randn(2, 64), q.planes, q.alpha, q.beta, None, 64, 32, 4)


def test_malformed_weights_are_refused():
    q = lowbit.rtn(torch.randn(8, 64), 3, 32)
    with pytest.raises(lowbit.QuantizeError, match="features"):
        ops.lut_linear(torch.randn(2, 65), q.planes, q.alpha, q.beta, None, 64, 32, 4)
    with pytest.raises(lowbit.QuantizeError, match="alpha"):
        ops.lut_linear(torch.randn(2, 64), q.planes, q.alpha[:, :1], q.beta, None, 64, 32, 4)


def _quantized_mlp():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(96, 80), torch.nn.GELU(), torch.nn.Linear(80, 64, bias=False)).eval()
    return fxpress.compress.quantize(mlp, bits=3, group_size=64, method="bcq", skip=()).model


def test_pass_fires_and_logs_its_choice_by_row_count():
    model = _quantized_mlp()
    for rows, path in ((2, "LUT"), (40, "dequantise per tile + mm")):
        torch._dynamo.reset()
        fxpress.counters.clear()
        x = torch.randn(rows, 96)
        report = fxpress.explain(model, x, target="cpu")  # the references: exact up to float rounding
        (graph,) = report.graphs
        assert graph.ops_after.get("fxpress.lut_linear.default") == 2
        assert "fxpress.dequantize_planes.default" not in graph.ops_after  # no dequantised weight left
        assert fxpress.counters["lut_matmul"][f"{rows} rows (lut_max_rows=4): {path}"] == 2
        assert report.max_abs_diff < 1e-5
    with pytest.raises(fxpress.OptionError, match="lut_max_rows"):
        fxpress.backend(lut_max_rows=-1)


def test_generate_through_the_pass_matches_eager():
    model = fxpress.compress.quantize(tiny_llama(), bits=4, group_size=32, method="rtn").model
    prompt = token_ids(batch=1, length=8)
    with torch.no_grad():
        eager = model.generate(prompt, max_new_tokens=8, do_sample=False)
        model.forward = torch.compile(model.forward, backend=fxpress.backend())
        out = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, eager)
    assert fxpress.counters["lut_matmul"]["mm(x, t(dequantized weight)) => lut_linear"] > 0


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
@pytest.mark.parametrize("n,k,group,rows", [(37, 200, 64, 1), (37, 200, 64, 3), (64, 96, 32, 40), (5, 256, 128, 17)])
def test_triton_kernels_match_the_reference(bits, n, k, group, rows, device):
    from fxpress.ops.kernels import lut

    g = torch.Generator().manual_seed(bits * rows)
    w, bias, x = torch.randn(n, k, generator=g), torch.randn(n, generator=g), torch.randn(rows, k, generator=g)
    q = lowbit.bcq(w, bits, group)
    reference = ops.lut_linear(x, q.planes, q.alpha, q.beta, bias, k, group, 4)
    out = torch.full((rows, n), float("nan"), device=device)
    on = lambda t: t.to(device)  # noqa: E731
    lut.lut_linear(on(x), on(q.planes), on(q.alpha), on(q.beta), on(bias), k, group, 4, out)  # LUT up to 4 rows
    torch.testing.assert_close(out.cpu(), reference, rtol=1e-4, atol=1e-4)


def test_triton_target_launches_the_lut_kernel():
    model = _quantized_mlp()
    x = torch.randn(2, 96)
    reports = []
    backend = fxpress.Backend(fxpress.Options(target="triton", strict=True), on_report=reports.append)
    with torch.no_grad():
        out, expected = torch.compile(model, backend=backend)(x), model(x)
    assert sum(name.startswith("op_lut_linear") for name in reports[-1].generated) == 2
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


class _UniformCodes(torch.nn.Module):
    """A model that dequantises its own integer weight in forward: (w_q - zero) * scale -> mm."""

    def __init__(self, out_features: int = 48, in_features: int = 128, group: int = 64, bits: int = 3) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(bits)
        groups = in_features // group
        self.register_buffer("w_q", torch.randint(0, 2 ** bits, (out_features, groups, group), generator=g,
                                                  dtype=torch.uint8))
        self.register_buffer("zero", torch.randint(0, 2 ** bits, (out_features, groups, 1), generator=g).float())
        self.register_buffer("scale", torch.rand(out_features, groups, 1, generator=g) * 0.1)
        self.shape = (out_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = ((self.w_q.float() - self.zero) * self.scale).reshape(self.shape)
        return x @ weight.T


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_generic_uniform_dequantise_then_matmul_is_repacked(bits):
    model, x = _UniformCodes(bits=bits).eval(), torch.randn(3, 128)
    report = fxpress.explain(model, x, target="cpu")  # exact; the cpp tables are tested in tests/native
    (graph,) = report.graphs
    assert graph.ops_after.get("fxpress.lut_linear.default") == 1 and "aten.sub.Tensor" not in graph.ops_after
    assert fxpress.counters["lut_matmul"]["(w_q - zero) * scale repacked into bit-planes"] == 1
    assert report.max_abs_diff < 1e-4


@pytest.mark.parametrize("rows", [1, 24])
def test_triton_kernels_in_half_precision(rows, device):
    """fp16 activations: the tiled GEMM multiplies in fp16, as dequantise-then-mm in fp16 would."""
    from fxpress.ops.kernels import lut

    g = torch.Generator().manual_seed(rows)
    w, x = torch.randn(40, 160, generator=g) * 0.1, torch.randn(rows, 160, generator=g)
    q = lowbit.rtn(w, 4, 32)
    reference = x.half().float() @ lowbit.dequantize(q.planes, q.alpha, q.beta, 160, 32).half().float().T
    out = torch.empty(rows, 40, dtype=torch.float16, device=device)
    on = lambda t: t.to(device)  # noqa: E731
    lut.lut_linear(on(x.half()), on(q.planes), on(q.alpha), on(q.beta), None, 160, 32, 4, out)
    torch.testing.assert_close(out.cpu().float(), reference, rtol=2e-3, atol=2e-3)
