"""The generated wrapper: readable, checks its inputs, keeps outputs out of the arena."""

from __future__ import annotations

import pytest
import torch

import fxpress
from fxpress.runtime.wrapper_support import InputError, check_input, out_variant
from tests.tiny_models import tiny_bert, token_ids


def _compile(model, *args, target="auto"):
    reports = []
    compiled = torch.compile(model, backend=fxpress.Backend(fxpress.Options(target=target), on_report=reports.append))
    with torch.no_grad():
        out = compiled(*args)
    return reports[-1], out


def test_wrapper_source_names_kernels_and_writes_into_slots():
    report, _ = _compile(tiny_bert(), token_ids())
    source = report.wrapper
    assert source.startswith("# fxpress wrapper for graph")
    assert "def call(args):" in source and "check_input(" in source
    assert "torch.ops.aten.addmm.out(" in source  # written straight into its arena slot
    assert any(line.strip().startswith("# reduction_") for line in source.splitlines())


def test_outputs_are_not_arena_memory():
    def fn(x):
        y = torch.relu(x) * 2
        return y + 1, y.sum(-1)

    x = torch.randn(4, 8)
    compiled = torch.compile(fn, backend="fxpress")
    with torch.no_grad():
        a2, _ = compiled(x)
        a3, _ = compiled(x + 1)  # a second call must not overwrite what the first returned
    assert torch.equal(a2, torch.relu(x) * 2 + 1) and not torch.equal(a2, a3)


def test_input_check_names_the_input():
    with pytest.raises(InputError, match="graph 7: input x must be torch.float32\\[4, \\?\\], got torch.int64\\[4, 3\\]"):
        check_input(torch.zeros(4, 3, dtype=torch.int64), "x", torch.float32, (4, None), "graph 7")


def test_out_variant_matches_schema():
    assert out_variant(torch.ops.aten.mm.default) is torch.ops.aten.mm.out
    assert out_variant(torch.ops.aten.add.Tensor) is torch.ops.aten.add.out
    assert out_variant(torch.ops.aten._to_copy.default) is None  # dtype kwargs the out form lacks


def test_plot_memory_draws_the_plan(tmp_path):
    report, _ = _compile(tiny_bert(), token_ids())
    path = fxpress.plot_memory(report.memory_plan, tmp_path / "plan.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_explain_reports_kernels_and_plan():
    text = str(fxpress.explain(tiny_bert(), token_ids()))
    assert "kernels:" in text and "x lower bound" in text


@pytest.mark.parametrize("target", ["cpu", "cpp"])
@pytest.mark.parametrize("batch", [3, 1])
def test_row_reductions_run_in_blocks_and_overwrite_their_dying_input(batch, target, monkeypatch):
    """On the cpu target, row reductions run as torch calls over blocks of rows; the cpp target
    generates them. Either way the LayerNorm's output may take the memory of an input dying there."""
    import fxpress.codegen.row_blocked as row_blocked

    monkeypatch.setattr(row_blocked, "BLOCK_ELEMENTS", 64)  # several blocks even at test sizes
    position = torch.randn(1, 10, 16)  # broadcast over the batch, as position embeddings are
    weight, bias, m = torch.randn(16), torch.randn(16), torch.randn(16, 16)

    def fn(x, y):
        h = torch.relu(x @ m)  # a buffer read by two kernels; it dies in the LayerNorm kernel,
        g = h.amax(-1, keepdim=True)  # which may write over it
        out = torch.nn.functional.layer_norm(h + y + position - g, (16,), weight, bias)
        return torch.softmax(out * 3, -1) + 1

    x, y = torch.randn(batch, 10, 16), torch.randn(batch, 10, 16)
    report, out = _compile(fn, x, y, target=target)
    if target == "cpu":
        assert report.wrapper.count("for start in range(") == 3  # amax, layer_norm, softmax
    else:
        assert sum("reduction" in name for name in report.generated) == 3
    assert report.memory_plan.reuses  # the LayerNorm output took h's slot
    assert (out - fn(x, y)).abs().max() <= 1e-6


def test_a_reduction_alone_in_its_kernel_runs_in_blocks():
    x = torch.randn(4, 6, 5)
    report, out = _compile(lambda t: torch.softmax(t, -1), x, target="cpu")
    assert "for start in range(" in report.wrapper
    assert (out - torch.softmax(x, -1)).abs().max() <= 1e-6


def test_views_of_constants_are_made_once_and_follow_in_place_updates():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    x = torch.randn(3, 8)
    report, _ = _compile(model, x)
    module_level, body = report.wrapper.split("def call(args):")
    assert "permute = torch.ops.aten.permute.default(" in module_level  # the transposed weight
    assert "permute.default" not in body
    compiled = torch.compile(model, backend="fxpress")
    with torch.no_grad():
        compiled(x)
        model[0].weight.mul_(2)  # in place: the hoisted view shows the new values
        torch.testing.assert_close(compiled(x), model(x))


def test_views_of_planned_buffers_are_made_with_each_arena():
    def fn(x):
        y = torch.relu(x) * 2  # a planned buffer
        return (y.view(4, 2, 8).transpose(1, 2) + 1).sum(-1)

    report, _ = _compile(fn, torch.randn(4, 16), target="cpu")
    slots, body = report.wrapper.split("def call(args):")
    assert "torch.ops.aten.view.default(" in slots.split("def _slots(")[1]
    assert "torch.ops.aten.view.default(" not in body and "transpose" not in body
    compiled = torch.compile(fn, backend=fxpress.backend(target="cpu"))
    with torch.no_grad():
        for _ in range(3):  # the arena and its views are taken again by each call
            x = torch.randn(4, 16)
            torch.testing.assert_close(compiled(x), fn(x))


def test_views_with_symbolic_sizes_stay_in_call():
    def fn(x):
        y = torch.relu(x) * 2
        return (y.view(x.shape[0], 2, 8) + 1).sum(-1)

    reports = []
    compiled = torch.compile(fn, backend=fxpress.Backend(fxpress.Options(target="cpu"), on_report=reports.append),
                             dynamic=True)
    with torch.no_grad():
        for rows in (3, 5):
            x = torch.randn(rows, 16)
            torch.testing.assert_close(compiled(x), fn(x))
    assert "torch.ops.aten.view.default(" in reports[-1].wrapper.split("def call(args):")[1]


def test_dtype_conversions_and_fxpress_ops_are_called_without_the_dispatcher():
    """prims.convert_element_type runs through Python (about 100 µs a call) and a custom op through
    torch's custom-op layers: the wrapper converts with copy_ / _to_copy and calls an fxpress op's
    Python function itself, with the same results."""
    def fn(x, w, eps):  # dynamic: eps is a float64 graph input, converted by prims
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return torch.ops.fxpress.rms_norm(y, w, 1e-6)

    x, w = torch.randn(4, 8) * 10, torch.rand(8)
    reports = []
    compiled = torch.compile(fn, backend=fxpress.Backend(fxpress.Options(), on_report=reports.append), dynamic=True)
    with torch.no_grad():
        compiled(x, w, 1e-5)
        out = compiled(x, w, 1e-3)
    source = reports[-1].wrapper
    assert "convert_element_type_default" in source and "prims.convert_element_type" not in source
    assert "torch.ops.fxpress" not in source and "FXPRESS_OPS['rms_norm']" in source
    torch.testing.assert_close(out, fn(x, w, 1e-3))
