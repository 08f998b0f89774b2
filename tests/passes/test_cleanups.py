"""The cleanup passes: dead code, no-op views, CSE — and what each must leave alone."""

from __future__ import annotations

import torch
from torch.testing import FileCheck

import fxpress
from fxpress.passes.cse import cse
from fxpress.passes.remove_noop_views import remove_noop_views
from tests.passes.graphs import capture, run

OPTS = fxpress.Options()


def test_cse_merges_repeated_work():
    x = torch.randn(4, 8)
    captured = capture(lambda t: torch.sin(t) + torch.sin(t), x)
    expected = run(captured, x)
    result = cse(captured.gm, opts=OPTS)
    FileCheck().check_count("aten.sin", 1, exactly=True).run(result.graph_module.code)
    assert torch.equal(result.graph_module(x)[0], expected[0])


def test_cse_keeps_random_ops_apart():
    captured = capture(lambda t: torch.rand_like(t) + torch.rand_like(t), torch.randn(4))
    result = cse(captured.gm, opts=OPTS)
    FileCheck().check_count("aten.rand_like.default", 2, exactly=True).run(result.graph_module.code)


def test_cse_keeps_input_mutations():
    def update(buf, a):
        buf.add_(a)
        buf.add_(a)
        return buf.sum()

    buf, a = torch.zeros(3), torch.ones(3)
    captured = capture(update, buf, a)
    result = cse(captured.gm, opts=OPTS)
    fresh = torch.zeros(3)
    result.graph_module(fresh, a)
    assert torch.equal(fresh, torch.full((3,), 2.0))


def test_noop_views_removed_but_outputs_never_alias_inputs():
    x = torch.randn(4, 8)
    captured = capture(lambda t: (t.view(4, 8) * 2).reshape(4, 8), x)
    result = remove_noop_views(captured.gm, opts=OPTS)
    assert result.modified and "view" not in result.graph_module.code
    assert torch.equal(result.graph_module(x)[0], x * 2)

    captured = capture(lambda t: t.view(4, 8), x)  # output = view of the input itself
    result = remove_noop_views(captured.gm, opts=OPTS)
    (out,) = result.graph_module(x)
    assert torch.equal(out, x)


def test_full_slice_is_a_noop():
    x = torch.randn(4, 8)
    captured = capture(lambda t: torch.relu(t)[:, 0:8] + 1, x)
    result = remove_noop_views(captured.gm, opts=OPTS)
    assert "slice" not in result.graph_module.code
    assert torch.equal(result.graph_module(x)[0], torch.relu(x) + 1)
