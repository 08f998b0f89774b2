"""GGUF's quantised tensors imported as bit-planes: each type's weights equal the gguf package's own
dequantisation (real SmolLM2 tensors for Q4_1 and Q8_0, real weights quantised by the package for
Q4_0; for the k-quants, which the package cannot write, real weights written as k-quant blocks by
tests/compress/gguf_blocks.py, and blocks of random bytes under realistic fp16 scales: every code
and sub-block scale pattern); LUT matmul over them; the model import."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fxpress
from fxpress import lowbit, workloads
from fxpress.compress import gguf_weights
from fxpress.compress.layer_records import describe, rebuild
from tests.compress import gguf_blocks

ops = torch.ops.fxpress
K_QUANTS = {"Q4_K": (144, [(0, 1e-3, 2e-2), (2, 1e-3, 2e-2)]), "Q5_K": (176, [(0, 1e-3, 2e-2), (2, 1e-3, 2e-2)]),
            "Q6_K": (210, [(208, 1e-4, 2e-3)])}  # bytes per 256 weights; fp16 fields (offset, low, high)


def _same_weights(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal bit for bit, zeros aside (+0 and -0 count as one)."""
    bits_equal = got.view(torch.int32) == expected.view(torch.int32)
    return got.shape == expected.shape and bool((bits_equal | ((got == 0) & (expected == 0))).all())


def _random_k_blocks(type_name: str, rows: int, columns: int, seed: int) -> np.ndarray:
    size, fields = K_QUANTS[type_name]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows * columns // 256, size), dtype=np.uint8)
    for at, low, high in fields:
        blocks[:, at:at + 2] = rng.uniform(low, high, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("type_name", sorted(K_QUANTS))
def test_k_quants_import_exactly(type_name):
    data = _random_k_blocks(type_name, 24, 512, seed=len(type_name))
    weight = gguf_weights.bit_planes(data, type_name, 24, 512)
    assert weight.group_size == (16 if type_name == "Q6_K" else 32)
    assert weight.bits == {"Q4_K": 4, "Q5_K": 5, "Q6_K": 6}[type_name]
    expected = gguf_weights.reference_weights(data, type_name, 24, 512)
    assert _same_weights(weight.dequantize(), expected)
    # The LUT op reads alpha and beta, which carry the offset to float rounding.
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(0))
    for max_rows in (0, 4):
        out = ops.lut_linear(x, weight.planes, weight.alpha, weight.beta, None, 512, weight.group_size, max_rows)
        torch.testing.assert_close(out, x @ expected.T, rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def smollm2_tensors():
    from gguf import GGUFReader

    try:
        return {t.name: t for t in GGUFReader(str(workloads.smollm2_gguf())).tensors}
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.mark.real_model
def test_real_q4_1_q8_0_and_q4_0_tensors_import_exactly(smollm2_tensors):
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    for name in ("blk.0.attn_q.weight", "blk.17.ffn_down.weight", "token_embd.weight"):
        tensor = smollm2_tensors[name]
        columns = int(tensor.shape[0])
        data = tensor.data[:1536]  # the embedding's first 1536 rows: as many as the widest Linear
        type_name = tensor.tensor_type.name
        assert type_name == ("Q8_0" if name == "token_embd.weight" else "Q4_1")
        expected = gguf_weights.reference_weights(data, type_name, len(data), columns)
        assert _same_weights(gguf_weights.bit_planes(data, type_name, len(data), columns).dequantize(), expected)
    real = gguf_weights.reference_weights(smollm2_tensors["blk.3.ffn_up.weight"].data, "Q4_1", 1536, 576)
    q4_0 = quantize(real.numpy(), GGMLQuantizationType.Q4_0)  # the package's own Q4_0 of real weights
    expected = gguf_weights.reference_weights(q4_0, "Q4_0", 1536, 576)
    assert _same_weights(gguf_weights.bit_planes(q4_0, "Q4_0", 1536, 576).dequantize(), expected)


@pytest.mark.real_model
@pytest.mark.parametrize("type_name", sorted(gguf_blocks.WRITERS))
def test_real_weights_written_as_k_quants_import_exactly(smollm2_tensors, type_name):
    tensor = smollm2_tensors["blk.5.ffn_down.weight"]  # 1536 columns: whole 256-weight super-blocks
    columns, rows = (int(n) for n in tensor.shape)
    real = gguf_weights.reference_weights(tensor.data, tensor.tensor_type.name, rows, columns)
    data = gguf_blocks.WRITERS[type_name](real.numpy()).reshape(rows, -1)
    expected = gguf_weights.reference_weights(data, type_name, rows, columns)
    assert float((expected - real).norm() / real.norm()) < 0.1  # the package reads back the weights written
    assert _same_weights(gguf_weights.bit_planes(data, type_name, rows, columns).dequantize(), expected)


def test_a_type_that_is_not_imported_and_a_wrong_size_are_refused():
    with pytest.raises(lowbit.QuantizeError, match=r"GGUF type Q2_K is not imported \(supported: \['Q4_0'"):
        gguf_weights.bit_planes(np.zeros(84, np.uint8), "Q2_K", 1, 256)
    with pytest.raises(lowbit.QuantizeError, match=r"GGUF Q4_K tensor of 144 bytes is not \[2, 256\]"):
        gguf_weights.bit_planes(np.zeros(144, np.uint8), "Q4_K", 2, 256)


def test_imported_layers_survive_a_layer_record_round_trip():
    data = _random_k_blocks("Q6_K", 8, 256, seed=3)
    layer = fxpress.compress.QuantizedLinear(gguf_weights.bit_planes(data, "Q6_K", 8, 256), None, 8)
    model = torch.nn.Sequential(torch.nn.Linear(256, 8, bias=False))
    model[0] = layer
    records = describe(model)
    assert records["0"]["offset"] is True
    empty = torch.nn.Sequential(torch.nn.Linear(256, 8, bias=False))
    rebuild(empty, records)
    empty.load_state_dict(model.state_dict())
    x = torch.randn(2, 256)
    with torch.no_grad():
        assert torch.equal(empty(x), model(x))
        assert torch.equal(model(x), F.linear(x, gguf_weights.reference_weights(data, "Q6_K", 8, 256)))


@pytest.mark.parametrize("type_name", ["Q6_K", "Q5_K"])
def test_compiled_imported_layers_run_the_lut_kernel_or_say_why_not(type_name):
    from fxpress.native import build

    target = "cpp" if build.compiler_refusal() is None else "cpu"
    data = _random_k_blocks(type_name, 40, 256, seed=5)
    model = torch.nn.Sequential(fxpress.compress.QuantizedLinear(
        gguf_weights.bit_planes(data, type_name, 40, 256), torch.randn(40), 40))
    x = torch.randn(2, 256)
    reports = []
    backend = fxpress.Backend(fxpress.Options(target=target), on_report=reports.append)
    with torch.no_grad():
        expected = model(x)
        actual = torch.compile(model, backend=backend)(x)
    # The cpp LUT path sums int16 tables (tests/native/test_cpp_lut.py: TABLE_RTOL); the rest is float.
    assert float((actual - expected).norm() / expected.norm()) < 3e-3
    (lut,) = [name for name, kind, _ in reports[-1].kernels if "lut_linear" in name]
    refusal = reports[-1].not_generated.get(lut, "")
    if type_name == "Q6_K" or target == "cpu":  # groups of 16: the reference runs, and explain() says why
        assert target == "cpu" or "groups of 16 columns (GGUF Q6_K)" in refusal
    else:
        assert not refusal
