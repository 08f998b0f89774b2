"""fuse_low_rank: which chains become low-rank ops, which are refused and why, and that the
rewritten graphs compute what the unfused ones did."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import fxpress
from fxpress.compress import LowRankLinear, svd
from fxpress.native import build
from fxpress.passes.fuse_low_rank import RULES, fuse_low_rank
from tests.conftest import max_diff
from tests.passes.graphs import capture, run
from tests.tiny_models import tiny_bert, tiny_llama, token_ids

FFN, ROTARY_ATTENTION, ATTENTION, LINEAR = (rule.name for rule in RULES)
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


_DECODERS = {  # family: (config, model, what sets it apart)
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),  # biased Q, K, V
    "cohere": (transformers.CohereConfig, transformers.CohereForCausalLM,  # interleaved rotation
               {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,  # q_norm, k_norm after the
               {"head_dim": 16, "sliding_window": 8}),  # transpose, sliding-window layers
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 16}),  # norms before it
}


def _tiny_decoder(family):
    """Tiny rotary decoders with grouped-query attention (4 query heads, 2 KV heads)."""
    if family == "llama":
        return tiny_llama()
    torch.manual_seed(0)
    config, model, extra = _DECODERS[family]
    shape = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return model._from_config(config(**shape, **extra), attn_implementation="sdpa").eval()


@pytest.mark.parametrize("family", ["llama", *_DECODERS])
@pytest.mark.parametrize("padded", [False, True])
def test_rotary_decoders_fuse_their_attention(family, padded):
    model = _compressed(_tiny_decoder(family))
    ids = token_ids()
    mask = torch.ones_like(ids)
    if padded:  # a 4-D mask reaches SDPA, and transformers copies the KV heads (repeat_kv)
        mask[1, 9:] = 0
    gm, counts = _fuse(lambda i, m: model(input_ids=i, attention_mask=m, use_cache=False).logits, ids, mask)
    assert counts == {ROTARY_ATTENTION: 2, FFN: 2}
    assert not any("scaled_dot_product" in t for t in _targets(gm))
    ops = [n for n in gm.graph.nodes if n.target is torch.ops.fxpress.lowrank_attention.default]
    assert [op.args[17] for op in ops] == [family == "cohere"] * 2  # Cohere's pairs, rotate_half otherwise
    assert all((op.args[18] is not None) == (family in ("gemma3", "qwen3")) for op in ops)  # q_norm


def test_a_first_forward_into_an_empty_cache_still_fuses():
    model = _compressed(tiny_llama())
    _, counts = _fuse(lambda i: model(i).logits, token_ids())  # a DynamicCache: cat([empty, k], -2)
    assert counts == {ROTARY_ATTENTION: 2, FFN: 2}


class _QueryOnlyRotation(nn.Module):
    """A rotary embedding on the queries alone: not one the op can take."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (_low_rank(32, 32, 6, bias=False) for _ in range(3))

    def forward(self, x, cos, sin):
        q, k, v = (proj(x).view(2, 9, 2, 16).transpose(1, 2) for proj in (self.q, self.k, self.v))
        q = q * cos.unsqueeze(1) + torch.cat((-q[..., 8:], q[..., :8]), dim=-1) * sin.unsqueeze(1)
        return F.scaled_dot_product_attention(q, k, v)


def test_a_rotation_of_the_queries_alone_is_refused_with_the_reason():
    _, counts = _fuse(_QueryOnlyRotation(), torch.randn(2, 9, 32), torch.randn(1, 9, 16), torch.randn(1, 9, 16))
    assert counts == {f"{ATTENTION} [not applied: a rotary embedding on some of query, key and value but not "
                      "on exactly the first two]": 1, LINEAR: 3}


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


@pytest.mark.parametrize("target", ["cpu", "triton", "cpp"])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_rotary_decoder_through_the_backend_matches_eager(family, target, monkeypatch):
    if target == "cpp" and build.compiler_refusal() is not None:
        pytest.skip("no working C++ compiler")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = _compressed(_tiny_decoder(family))
    ids = token_ids(length=20)
    mask = torch.ones_like(ids)
    mask[0, 13:] = 0
    reports = []
    backend = fxpress.Backend(fxpress.Options(target=target, strict=True), on_report=reports.append)
    run_model = lambda m: m(input_ids=ids, attention_mask=mask, use_cache=False).logits
    with torch.no_grad():
        expected = run_model(model)
        actual = run_model(torch.compile(model, backend=backend))
    assert max_diff(actual, expected) <= 1e-4
    (fused,) = [p.counters["fuse_low_rank"] for p in reports[-1].passes if p.name == "fuse_low_rank"]
    assert fused[ROTARY_ATTENTION] == 2
    low_rank = {name for name, kind, _ in reports[-1].kernels if kind == "op" and "lowrank" in name}
    assert len(low_rank) == 4  # 2 attention + 2 FFN kernels
    if target != "cpu":
        assert not low_rank & set(reports[-1].not_generated)  # none left to the reference


def test_dense_models_are_not_candidates():
    model = tiny_bert()
    ids = token_ids()
    _, counts = _fuse(lambda i: model(i).last_hidden_state, ids)
    assert counts == {}  # nothing fired, nothing refused: no noise in explain() for dense models
    stacked = nn.Sequential(nn.Linear(16, 64), nn.Linear(64, 16))  # two Linears, not a factorisation
    _, counts = _fuse(stacked, torch.randn(3, 16))
    assert counts == {}
