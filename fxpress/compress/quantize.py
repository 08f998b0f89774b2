"""``fxpress.compress.quantize``: Linear layers to low-bit ``QuantizedLinear`` (RTN, BCQ, and with
calibration data activation-weighted BCQ or GPTQ), and the real low-bit weights of a GGUF file (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K)
into the same format.

    result = fxpress.compress.quantize(model, bits=3, group_size=128, method="bcq")
    compiled = torch.compile(result.model, backend="fxpress")   # lut_matmul: no dequantised weights
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

import fxpress.lowbit as lowbit
from fxpress.core.progress import progress
from fxpress.compress.calibration import input_grams
from fxpress.compress.gptq import gptq
from fxpress.compress.layer_records import record as record_layers
from fxpress.compress.linear_layers import matching_linears, set_submodule
from fxpress.compress.quantized_linear import QuantizedLinear
from fxpress.compress.sharded_linear import local_shard

METHODS = {"rtn": lowbit.rtn, "bcq": lowbit.bcq}


@dataclass
class QuantizeResult:
    """The quantised model (a copy) and, per layer, what it cost; ``str()`` is a table of the layers."""

    model: nn.Module
    layers: dict[str, float] = field(default_factory=dict)  # name -> relative weight error
    # name -> ||(W' - W) X^T|| / ||W X^T|| over the calibration inputs X (with calibration= only)
    output_errors: dict[str, float] = field(default_factory=dict)
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (in, out) features
    weight_bytes: int = 0  # of the quantised layers, planes and scales
    fp32_bytes: int = 0  # of the same layers in fp32
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why it was left as it was

    def __str__(self) -> str:
        errors = list(self.layers.values())
        lines = [f"{len(self.layers)} Linear layers quantised: {self.weight_bytes / 2**20:.2f} MiB "
                 f"({self.weight_bytes / max(self.fp32_bytes, 1):.3f} of fp32); relative weight error "
                 f"mean {sum(errors) / max(len(errors), 1):.4f}, max {max(errors, default=0):.4f}",
                 f"{'layer':<48} {'shape':>11} {'weight err':>10} {'output err':>10}"]
        for name, error in self.layers.items():
            shape = "x".join(map(str, self.shapes.get(name, ())))
            output = self.output_errors.get(name)
            lines.append(f"{name:<48} {shape:>11} {error:>10.4f} {'-' if output is None else f'{output:.4f}':>10}")
        lines += [f"{name:<48} {'':>11}   left as it was ({why})" for name, why in self.skipped.items()]
        return "\n".join(lines)


def quantize(model: nn.Module, bits: int = 4, group_size: int = 128, method: str | None = None,
             targets: str | Iterable[str] = "*", skip: Iterable[str] = ("lm_head",),
             calibration: Iterable[Any] | None = None) -> QuantizeResult:
    """A copy of ``model`` whose ``nn.Linear`` layers (and transformers ``Conv1D``, GPT-2's) matching
    ``targets`` (globs) and not ``skip`` are ``QuantizedLinear``. ``method``: ``"rtn"`` (uniform
    asymmetric round-to-nearest), ``"bcq"`` (LUT-GEMM's binary-coding quantisation; with
    ``calibration``, its scales fitted by least squares weighted by each input's mean square) or
    ``"gptq"`` (uniform codes that minimise each layer's output error on ``calibration``, a few
    batches of model inputs as ``compress.svd`` takes them). The default is ``"bcq"`` weighted by
    the calibration inputs when batches are given, else ``"rtn"``."""
    # With calibration, the measured best (bench/results/fidelity-weights-bcq-cpu-2026-12-04.md):
    # weighted BCQ 1.12x / 1.99x fp32 perplexity at 4 / 3 bits on SmolLM2, GPTQ 1.26x / 2.18x.
    method = method or ("bcq" if calibration is not None else "rtn")
    if method not in METHODS and method != "gptq":
        raise lowbit.QuantizeError(f"method={method!r} is not one of {sorted([*METHODS, 'gptq'])}")
    if method == "gptq" and calibration is None:
        raise lowbit.QuantizeError("method='gptq' without calibration=: GPTQ needs calibration batches")
    if method == "rtn" and calibration is not None:
        raise lowbit.QuantizeError("method='rtn' with calibration=: round-to-nearest does not use calibration "
                                   "batches (GPTQ and BCQ do)")
    lowbit.check_format(bits, group_size)
    patterns = [targets] if isinstance(targets, str) else list(targets)
    skipped = list(skip)
    out = copy.deepcopy(model)
    result = QuantizeResult(out)
    layers = matching_linears(out, patterns, skipped)
    grams = input_grams(out, layers, calibration, "fxpress.compress.quantize") if calibration is not None else {}
    for name, layer in progress(layers.items(), f"quantize ({method}, {bits}-bit)", total=len(layers)):
        module, wrap = local_shard(layer, name)  # a tensor-parallel layer: this rank's shard
        if method == "gptq":
            weight = gptq(module.weight, grams[name], bits, group_size)
        elif name in grams:  # BCQ fitted to the columns the calibration inputs use most
            weight = lowbit.bcq(module.weight, bits, group_size, importance=torch.diagonal(grams[name]))
        else:
            weight = METHODS[method](module.weight, bits, group_size)
        _replace(result, name, module, weight, grams.get(name), wrap)
    if not result.layers:
        raise lowbit.QuantizeError(f"no nn.Linear layer matches targets={patterns} outside skip={skipped}")
    record_layers(out)
    return result


def _replace(result: QuantizeResult, name: str, linear: nn.Linear, weight: lowbit.BitPlaneWeight,
             gram: torch.Tensor | None = None, wrap: Callable[[nn.Module], nn.Module] | None = None) -> None:
    w = linear.weight.detach().float()
    approx = weight.dequantize()
    result.layers[name] = float((approx - w).norm() / w.norm().clamp(min=1e-30))
    result.shapes[name] = (linear.in_features, linear.out_features)
    if gram is not None:  # with G = X^T X: ||E X^T||^2 = trace(E G E^T)
        error, exact = (approx - w).double(), w.double()
        energy = float((exact @ gram * exact).sum())
        result.output_errors[name] = float(((error @ gram * error).sum() / max(energy, 1e-300)) ** 0.5)
    result.weight_bytes += weight.nbytes()
    result.fp32_bytes += w.numel() * 4
    quantized = QuantizedLinear(weight, linear.bias, linear.out_features)
    set_submodule(result.model, name, quantized if wrap is None else wrap(quantized))


def load_gguf(model: nn.Module, gguf_path: str | Path) -> QuantizeResult:
    """A copy of ``model`` (the fp32 model the GGUF was converted to) whose Linear layers stored in
    ``gguf_path`` as Q4_0, Q4_1, Q8_0, Q4_K, Q5_K or Q6_K become ``QuantizedLinear`` holding exactly
    those weights (``fxpress.compress.gguf_weights``: the file's codes and every block's scale, so
    dequantising gives the package's own weights bit for bit). Layers stored in other types stay
    as they are and are listed in ``result.skipped``."""
    from gguf import GGUFReader

    from fxpress.compress.gguf_names import hf_linear_names, unpermute_rows
    from fxpress.compress.gguf_weights import DECODERS, scaled_codes

    reader = GGUFReader(str(gguf_path))
    names = hf_linear_names(model)
    out = copy.deepcopy(model)
    result = QuantizeResult(out)
    for tensor in reader.tensors:
        if tensor.name not in names:
            continue
        name, type_name = names[tensor.name], tensor.tensor_type.name
        if type_name not in DECODERS:
            result.skipped[name] = f"GGUF type {type_name}"
            continue
        linear = out.get_submodule(name)
        codes, scale, offset, bits = scaled_codes(tensor.data, type_name, linear.out_features, linear.in_features)
        if name.endswith(("q_proj", "k_proj")):  # llama.cpp stores Q and K rows rotary-interleaved
            config = model.config
            heads = config.num_attention_heads if name.endswith("q_proj") else config.num_key_value_heads
            codes, scale, offset = (unpermute_rows(t, heads) for t in (codes, scale, offset))
        _replace(result, name, linear, lowbit.from_scaled_codes(codes, scale, offset, bits, linear.in_features))
    if not result.layers:
        raise lowbit.QuantizeError(f"{gguf_path}: no tensor of a type in {sorted(DECODERS)} matches a Linear "
                                   "layer of the model")
    record_layers(out)
    return result
