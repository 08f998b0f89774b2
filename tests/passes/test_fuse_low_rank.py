"""fuse_low_rank: which chains become low-rank ops, which are refused and why, and that the
rewritten graphs compute what the unfused ones did."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxpress
from fxpress.compress import LowRankLinear, svd
from fxpress.native import build
from fxpress.passes.fuse_low_rank import RULES, fuse_low_rank
from tests.conftest import max_diff
from tests.passes.graphs import capture, run
from tests.tiny_models import tiny_bert, tiny_llama, token_ids

LINEAR, ATTENTION = RULES[2].name, RULES[1].name
FFN = RULES[0].name
TOL = 1e-5


def _low_rank(n_in, n_out, rank, bias=True):
    torch.manual_seed(n_in + n_out + rank)
    layer = LowRankLinear(n_in, n_out, rank, bias=bias)
    for p in layer.parameters():
        nn.init.normal_(p, std=0.2)
    return layer


def _fuse(module, *args):
    captured = capture(module, *args)
    expected = run(captured, *args)
    result = fuse_low_rank(captured.gm, opts=fxpress.Options())
    actual = run(captured, *args)
    for a, e in zip(actual, expected):
        assert max_diff(a, e) <= TOL
    return result.graph_module, fxpress.counters["fuse_low_rank"]


def _targets(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def test_factored_linear_becomes_lowrank_linear():
    gm, counts = _fuse(_low_rank(48, 40, 8), torch.randn(2, 9, 48))
    assert counts == {LINEAR: 1}
    assert "fxpress.lowrank_linear.default" in _targets(gm) and "aten.mm.default" not in _targets(gm)


class _FFN(nn.Module):
    def __init__(self, act, gated=False):
        super().__init__()
        self.up, self.down, self.act = _low_rank(32, 96, 8), _low_rank(96, 32, 10), act
        self.gate = _low_rank(32, 96, 6) if gated else None

    def forward(self, x):
        h = self.act(self.gate(x)) * self.up(x) if self.gate is not None else self.act(self.up(x))
        return self.down(h)


@pytest.mark.parametrize("act, gated", [(nn.GELU(), False), (nn.GELU("tanh"), False), (nn.SiLU(), False),
                                        (nn.ReLU(), False), (nn.SiLU(), True)])
def test_ffn_becomes_one_lowrank_ffn(act, gated):
    gm, counts = _fuse(_FFN(act, gated), torch.randn(2, 7, 32))
    assert counts == {FFN: 1}
    assert _targets(gm).count("fxpress.lowrank_ffn.default") == 1 and "aten.gelu.default" not in _targets(gm)


def test_unknown_activation_is_reported_and_the_linears_still_fuse():
    gm, counts = _fuse(_FFN(nn.Tanh()), torch.randn(2, 7, 32))
    assert counts[f"{FFN} [not applied: unknown activation aten.tanh.default between the low-rank projections]"] == 1
    assert counts[LINEAR] == 2


def test_a_rank_that_saves_nothing_is_refused():
    gm, counts = _fuse(_low_rank(16, 16, 8), torch.randn(3, 16))
    assert counts == {f"{LINEAR} [not applied: rank 8 is not small for 16->16 (r*(in+out) >= in*out)]": 1}
    assert "aten.mm.default" in _targets(gm)


def test_an_inner_bias_is_refused():
    chain = nn.Sequential(nn.Linear(32, 4), nn.Linear(4, 32))
    _, counts = _fuse(chain, torch.randn(3, 32))
    assert counts == {f"{LINEAR} [not applied: the inner (rank-r) projection has a bias]": 1}


def test_intermediate_with_other_users_is_refused():
    class Tap(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = _low_rank(32, 32, 4)

        def forward(self, x):
            p = self.layer.down(x)
            return self.layer.up(p), p.sum()

    _, counts = _fuse(Tap(), torch.randn(3, 32))
    assert counts == {f"{LINEAR} [not applied: the rank-r intermediate has other users]": 1}


def _compressed(model, **kw):
    return svd(model, rank_ratio=0.5, targets="*layer*", **kw).model


def test_compressed_bert_fuses_attention_with_its_output_factor_and_ffn():
    model = _compressed(tiny_bert())
    ids = token_ids()
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # padding: a boolean key mask reaches SDPA
    gm, counts = _fuse(lambda i, m: model(input_ids=i, attention_mask=m).last_hidden_state, ids, mask)
    assert counts == {ATTENTION: 2, FFN: 2}
    targets = _targets(gm)
    assert "aten.where.self" not in targets  # the additive mask gave way to its boolean
    assert not any("scaled_dot_product" in t for t in targets)


def test_llama_attention_with_rotary_is_refused_but_its_mlp_fuses():
    model = _compressed(tiny_llama())
    _, counts = _fuse(lambda i: model(i).logits, token_ids())
    assert counts[FFN] == 2
    refused = [k for k in counts if k.startswith(ATTENTION)]
    assert refused == [f"{ATTENTION} [not applied: query is not a low-rank projection split into heads "
                       "(other ops in between?)]"]


def _plan(model, *args, disable=()):
    reports = []
    backend = fxpress.Backend(fxpress.Options(disable=list(disable)), on_report=reports.append)
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(*args)
    return out, reports[-1]


def test_plan_no_longer_holds_the_wide_intermediates():
    ffn = _FFN(nn.GELU())
    x = torch.randn(4, 64, 32)
    fused_out, fused = _plan(ffn, x)
    unfused_out, unfused = _plan(ffn, x, disable=["fuse_low_rank"])
    wide = 4 * 64 * 96 * 4  # the D-wide activation, in bytes
    sizes = lambda r: [int(s["nbytes"]) for s in r.memory_plan.to_dict()["slots"].values()]
    assert max(sizes(unfused)) >= wide and max(sizes(fused), default=0) < wide
    assert fused.plan["arena_bytes"] < unfused.plan["arena_bytes"]
    assert max_diff(fused_out, unfused_out) <= TOL


@pytest.mark.parametrize("target", ["cpu", "triton", "cpp"])
def test_compressed_bert_through_the_backend_matches_eager(target, monkeypatch):
    if target == "cpp" and build.compiler_refusal() is not None:
        pytest.skip("no working C++ compiler")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = _compressed(tiny_bert())
    ids = token_ids(length=20)
    mask = torch.ones_like(ids)
    mask[0, 13:] = 0
    reports = []
    backend = fxpress.Backend(fxpress.Options(target=target, strict=True), on_report=reports.append)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
        actual = torch.compile(model, backend=backend)(input_ids=ids, attention_mask=mask).last_hidden_state
    assert max_diff(actual, expected) <= TOL
    generated = {name for name, kind, _ in reports[-1].kernels if kind == "op"} - set(reports[-1].not_generated)
    if target != "cpu":
        assert len(generated) == 4  # 2 attention + 2 FFN kernels


def test_dense_models_are_not_candidates():
    model = tiny_bert()
    ids = token_ids()
    _, counts = _fuse(lambda i: model(i).last_hidden_state, ids)
    assert counts == {}  # nothing fired, nothing refused: no noise in explain() for dense models
    stacked = nn.Sequential(nn.Linear(16, 64), nn.Linear(64, 16))  # two Linears, not a factorisation
    _, counts = _fuse(stacked, torch.randn(3, 16))
    assert counts == {}
