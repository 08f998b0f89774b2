"""explain() reports graphs, breaks, passes, op histograms, fallbacks and the error vs eager."""

from __future__ import annotations

import json

import torch

import fxpress
from tests.tiny_models import tiny_llama, token_ids


def test_explain_report_on_llama():
    report = fxpress.explain(tiny_llama(), token_ids())
    assert len(report.graphs) == 1 and report.graph_breaks == {}
    graph = report.graphs[0]
    assert [p.name for p in graph.passes] == [p.__name__ for p in fxpress.PIPELINE]
    rms = next(p for p in graph.passes if p.name == "fuse_rms_norm")
    assert sum(rms.counters["fuse_rms_norm"].values()) == 5  # 2 layers x 2 norms + final norm
    assert graph.ops_before["aten.rsqrt.default"] == 5 and "aten.rsqrt.default" not in graph.ops_after
    assert graph.ops_after["fxpress.rms_norm.default"] == 5
    assert graph.frozen_weights > 0 and graph.unsupported == []
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-5
    text = str(report)
    assert "fuse_rms_norm" in text and "fxpress.rms_norm.default" in text and "left to fallback: none" in text
    json.dumps(report.to_dict())  # serialisable as is


def test_explain_counts_graph_breaks():
    def broken(x):
        y = x * 2
        print("side effect")  # Dynamo breaks the graph here
        return y + 1

    report = fxpress.explain(broken, torch.randn(3))
    assert len(report.graphs) == 2
    assert sum(report.graph_breaks.values()) >= 1
    assert report.max_abs_diff == 0.0


def test_explain_lists_fallback_nodes():
    from tests.compiler.test_fallback import Branchy

    report = fxpress.explain(Branchy(), torch.randn(4))
    graph = report.graphs[0]
    assert graph.fallback_reason and graph.unsupported[0].op == "cond"
    assert "unsupported: cond" in str(report)
