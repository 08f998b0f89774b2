"""``fxpress.compress.quantize``: Linear layers to low-bit ``QuantizedLinear`` (RTN or BCQ), and the
real 4-bit weights of a GGUF file into the same format.

    result = fxpress.compress.quantize(model, bits=3, group_size=128, method="bcq")
    compiled = torch.compile(result.model, backend="fxpress")   # lut_matmul: no dequantised weights
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

import fxpress.lowbit as lowbit
from fxpress.core.progress import progress
from fxpress.compress.layer_records import record as record_layers
from fxpress.compress.linear_layers import matching_linears, set_submodule
from fxpress.compress.quantized_linear import QuantizedLinear

METHODS = {"rtn": lowbit.rtn, "bcq": lowbit.bcq}


@dataclass
class QuantizeResult:
    model: nn.Module
    layers: dict[str, float] = field(default_factory=dict)  # name -> relative weight error
    weight_bytes: int = 0  # of the quantised layers, planes and scales
    fp32_bytes: int = 0  # of the same layers in fp32

    def __str__(self) -> str:
        errors = list(self.layers.values())
        return (f"{len(self.layers)} Linear layers quantised: {self.weight_bytes / 2**20:.2f} MiB "
                f"({self.weight_bytes / max(self.fp32_bytes, 1):.3f} of fp32); relative weight error "
                f"mean {sum(errors) / max(len(errors), 1):.4f}, max {max(errors, default=0):.4f}")


def quantize(model: nn.Module, bits: int = 4, group_size: int = 128, method: str = "rtn",
             targets: str | Iterable[str] = "*", skip: Iterable[str] = ("lm_head",)) -> QuantizeResult:
    """A copy of ``model`` whose ``nn.Linear`` layers (and transformers ``Conv1D``, GPT-2's) matching
    ``targets`` (globs) and not ``skip`` are ``QuantizedLinear``. ``method``: ``"rtn"`` (uniform asymmetric) or ``"bcq"`` (LUT-GEMM's
    binary-coding quantisation)."""
    if method not in METHODS:
        raise lowbit.QuantizeError(f"method={method!r} is not one of {sorted(METHODS)}")
    lowbit.check_format(bits, group_size)
    patterns = [targets] if isinstance(targets, str) else list(targets)
    skipped = list(skip)
    out = copy.deepcopy(model)
    result = QuantizeResult(out)
    layers = matching_linears(out, patterns, skipped)
    for name, module in progress(layers.items(), f"quantize ({method}, {bits}-bit)", total=len(layers)):
        weight = METHODS[method](module.weight, bits, group_size)
        _replace(result, name, module, weight)
    if not result.layers:
        raise lowbit.QuantizeError(f"no nn.Linear layer matches targets={patterns} outside skip={skipped}")
    record_layers(out)
    return result


def _replace(result: QuantizeResult, name: str, linear: nn.Linear, weight: lowbit.BitPlaneWeight) -> None:
    w = linear.weight.detach().float()
    approx = lowbit.dequantize(weight.planes, weight.alpha, weight.beta, weight.in_features, weight.group_size)
    result.layers[name] = float((approx - w).norm() / w.norm().clamp(min=1e-30))
    result.weight_bytes += weight.nbytes()
    result.fp32_bytes += w.numel() * 4
    set_submodule(result.model, name, QuantizedLinear(weight, linear.bias, linear.out_features))


def from_q4_1(blocks_d: torch.Tensor, blocks_m: torch.Tensor, codes: torch.Tensor) -> lowbit.BitPlaneWeight:
    """GGUF Q4_1 (blocks of 32: ``w = d * code + m``) as bit-planes with group size 32, exactly:
    ``zero = -m / d`` is never formed; ``alpha_i = d * 2**(i-1)``, ``beta = d * 7.5 + m``. ``codes`` is
    ``[out, in]`` of 0..15, ``d`` and ``m`` are ``[out, in / 32]``."""
    n, k = codes.shape
    weight = lowbit.from_codes(codes.view(n, k // 32, 32), torch.zeros_like(blocks_d, dtype=torch.float32),
                               blocks_d, 4)
    d, m = blocks_d.to(torch.float32), blocks_m.to(torch.float32)
    return lowbit.BitPlaneWeight(weight.planes, weight.alpha, d * 7.5 + m, k, 32)


def load_gguf_q4_1(model: nn.Module, gguf_path: str | Path) -> QuantizeResult:
    """A copy of ``model`` (the fp32 model the GGUF was converted to) whose Linear layers stored as
    Q4_1 in ``gguf_path`` become ``QuantizedLinear`` holding exactly those 4-bit weights."""
    from gguf import GGMLQuantizationType, GGUFReader

    from fxpress.compress.gguf_names import hf_linear_names, unpermute_rows

    reader = GGUFReader(str(gguf_path))
    names = hf_linear_names(model)
    out = copy.deepcopy(model)
    result = QuantizeResult(out)
    for tensor in reader.tensors:
        if tensor.tensor_type != GGMLQuantizationType.Q4_1 or tensor.name not in names:
            continue
        name = names[tensor.name]
        linear = out.get_submodule(name)
        n, k = linear.out_features, linear.in_features
        raw = torch.from_numpy(tensor.data.copy()).view(torch.uint8).reshape(n, k // 32, 20)
        d = raw[..., 0:2].contiguous().view(torch.float16).squeeze(-1)
        m = raw[..., 2:4].contiguous().view(torch.float16).squeeze(-1)
        packed = raw[..., 4:].to(torch.int64)  # 16 bytes: low nibbles are codes 0..15, high 16..31
        codes = torch.cat([packed & 15, packed >> 4], dim=-1).reshape(n, k)
        if name.endswith(("q_proj", "k_proj")):  # llama.cpp stores Q and K rows rotary-interleaved
            config = model.config
            heads = config.num_attention_heads if name.endswith("q_proj") else config.num_key_value_heads
            d, m, codes = (unpermute_rows(t, heads) for t in (d, m, codes))
        _replace(result, name, linear, from_q4_1(d, m, codes))
    if not result.layers:
        raise lowbit.QuantizeError(f"{gguf_path}: no Q4_1 tensor matches a Linear layer of the model")
    record_layers(out)
    return result
