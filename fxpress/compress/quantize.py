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
from fxpress.compress.distill import check_distillation, distill
from fxpress.compress.equalize import equalize
from fxpress.compress.gptq import gptq
from fxpress.compress.layer_records import record as record_layers
from fxpress.compress.linear_layers import matching_linears, set_submodule
from fxpress.compress.quantized_linear import QuantizedLinear
from fxpress.compress.sharded_linear import is_sharded, local_shard

METHODS = {"rtn": lowbit.rtn, "bcq": lowbit.bcq}
CALIBRATED = ("gptq", "gptq-bcq")  # methods that need calibration batches


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
    # first Linear of each group whose inputs were scaled (compress.equalize) -> the chosen alpha
    equalized: dict[str, float] = field(default_factory=dict)
    distill_losses: list[float] = field(default_factory=list)  # each distillation epoch's mean loss

    def __str__(self) -> str:
        errors = list(self.layers.values())
        lines = [f"{len(self.layers)} Linear layers quantised: {self.weight_bytes / 2**20:.2f} MiB "
                 f"({self.weight_bytes / max(self.fp32_bytes, 1):.3f} of fp32); relative weight error "
                 f"mean {sum(errors) / max(len(errors), 1):.4f}, max {max(errors, default=0):.4f}",
                 f"{'layer':<48} {'shape':>11} {'weight err':>10} {'output err':>10}"]
        if self.distill_losses:
            lines.insert(1, f"scales then distilled for {len(self.distill_losses)} epochs (errors below are after): "
                            f"loss {self.distill_losses[0]:.4g} (first epoch) -> {self.distill_losses[-1]:.4g} (last)")
        for name, error in self.layers.items():
            shape = "x".join(map(str, self.shapes.get(name, ())))
            output = self.output_errors.get(name)
            lines.append(f"{name:<48} {shape:>11} {error:>10.4f} {'-' if output is None else f'{output:.4f}':>10}")
        lines += [f"{name:<48} {'':>11}   left as it was ({why})" for name, why in self.skipped.items()]
        if self.equalized:
            scaled = sum(alpha > 0 for alpha in self.equalized.values())
            lines.append(f"inputs scaled (AWQ) for {scaled} of {len(self.equalized)} groups of Linears sharing an "
                         f"input; alphas {sorted(set(self.equalized.values()))}")
        return "\n".join(lines)


def quantize(model: nn.Module, bits: int = 4, group_size: int = 128, method: str | None = None,
             targets: str | Iterable[str] = "*", skip: Iterable[str] = ("lm_head",),
             calibration: Iterable[Any] | None = None, scale_dtype: torch.dtype = torch.float16,
             distill_epochs: int = 0, distill_lr: float = 1e-4,
             distill_batches: Iterable[Any] | None = None) -> QuantizeResult:
    """A copy of ``model`` whose ``nn.Linear`` layers (and transformers ``Conv1D``, GPT-2's) matching
    ``targets`` (globs) and not ``skip`` are ``QuantizedLinear``. ``method``: ``"rtn"`` (uniform
    asymmetric round-to-nearest), ``"bcq"`` (LUT-GEMM's binary-coding quantisation; with
    ``calibration``, its scales fitted by least squares weighted by each input's mean square) or
    ``"gptq"`` (uniform codes that minimise each layer's output error on ``calibration``, a few
    batches of model inputs as ``compress.svd`` takes them) or ``"gptq-bcq"`` (Llama-style layers'
    inputs scaled AWQ's way first, ``compress.equalize``, then GPTQ's error feedback on the
    activation-weighted BCQ grid). The default is ``"gptq-bcq"`` when batches are given, else
    ``"rtn"``. ``scale_dtype``: how the scales are stored (float16, as GGUF, GPTQ and AWQ files keep
    them, or float32). ``distill_epochs``: then train every quantised layer's scales (its codes
    frozen) that many passes over the calibration batches, with Adam from ``distill_lr`` decaying
    to zero, to reproduce the model's output (``compress.distill``); over ``distill_batches``
    instead, when given (a larger corpus than GPTQ's statistics need, say)."""
    # With calibration, the measured best (bench/results/fidelity-weights-cpu-2026-12-05.md): on
    # SmolLM2 at 4 bits in groups of 192 (4.42 bits a weight), gptq-bcq 1.09x fp32 perplexity,
    # GPTQ on the BCQ grid without the scaling 1.13x, weighted BCQ 1.18x.
    method = method or ("gptq-bcq" if calibration is not None else "rtn")
    if method not in METHODS and method not in CALIBRATED:
        raise lowbit.QuantizeError(f"method={method!r} is not one of {sorted([*METHODS, *CALIBRATED])}")
    if method in CALIBRATED and calibration is None:
        raise lowbit.QuantizeError(f"method={method!r} without calibration=: GPTQ needs calibration batches")
    if method == "rtn" and calibration is not None:
        raise lowbit.QuantizeError("method='rtn' with calibration=: round-to-nearest does not use calibration "
                                   "batches (GPTQ and BCQ do)")
    distill_batches = None if distill_batches is None else list(distill_batches)
    check_distillation("fxpress.compress.quantize", distill_epochs, distill_lr, calibration, distill_batches)
    lowbit.check_format(bits, group_size)
    if scale_dtype not in lowbit.SCALE_DTYPES:
        raise lowbit.QuantizeError(f"scale dtype {scale_dtype} is not one of {lowbit.SCALE_DTYPES}")
    patterns = [targets] if isinstance(targets, str) else list(targets)
    skipped = list(skip)
    out = copy.deepcopy(model)
    result = QuantizeResult(out)
    layers = matching_linears(out, patterns, skipped)
    if distill_epochs and any(map(is_sharded, layers.values())):
        raise lowbit.QuantizeError("distill_epochs on a tensor-parallel model would train each rank's shard on its "
                                   "own; distil the unsharded model, then shard it")
    batches = None if calibration is None else list(calibration)
    grams = input_grams(out, layers, batches, "fxpress.compress.quantize") if batches is not None else {}
    if method == "gptq-bcq" and not any(map(is_sharded, layers.values())):  # not per shard (yet)
        result.equalized = equalize(out, layers, grams, bits, group_size)
    exact = {}  # name -> the Linear a layer replaced (its weight as quantised: after any input scaling)
    for name, layer in progress(layers.items(), f"quantize ({method}, {bits}-bit)", total=len(layers)):
        module, wrap = local_shard(layer, name)  # a tensor-parallel layer: this rank's shard
        exact[name] = module
        if method in CALIBRATED:
            grid = "bcq" if method == "gptq-bcq" else "uniform"
            weight = gptq(module.weight, grams[name], bits, group_size, grid=grid)
        elif name in grams:  # BCQ fitted to the columns the calibration inputs use most
            weight = lowbit.bcq(module.weight, bits, group_size, importance=torch.diagonal(grams[name]))
        else:
            weight = METHODS[method](module.weight, bits, group_size)
        _replace(result, name, module, weight.with_scales(scale_dtype), grams.get(name), wrap)
    if not result.layers:
        raise lowbit.QuantizeError(f"no nn.Linear layer matches targets={patterns} outside skip={skipped}")
    if distill_epochs:
        trained_on = batches if distill_batches is None else distill_batches
        result.distill_losses = distill(out, model, trained_on, distill_epochs, distill_lr, "fxpress.compress.quantize")
        for name in result.layers:  # the table reports the weights as they now are
            quantized = out.get_submodule(name)
            weight = lowbit.BitPlaneWeight(quantized.planes, quantized.alpha, quantized.beta, quantized.in_features,
                                           quantized.group_size)
            _measure(result, name, exact[name].weight, weight, grams.get(name))
    record_layers(out)
    return result


def _replace(result: QuantizeResult, name: str, linear: nn.Linear, weight: lowbit.BitPlaneWeight,
             gram: torch.Tensor | None = None, wrap: Callable[[nn.Module], nn.Module] | None = None) -> None:
    _measure(result, name, linear.weight, weight, gram)
    result.shapes[name] = (linear.in_features, linear.out_features)
    result.weight_bytes += weight.nbytes()
    result.fp32_bytes += linear.weight.numel() * 4
    quantized = QuantizedLinear(weight, linear.bias, linear.out_features)
    set_submodule(result.model, name, quantized if wrap is None else wrap(quantized))


def _measure(result: QuantizeResult, name: str, exact: torch.Tensor, weight: lowbit.BitPlaneWeight,
             gram: torch.Tensor | None) -> None:
    """The layer's relative weight error, and its output error on the calibration inputs."""
    w = exact.detach().float()
    approx = weight.dequantize()
    result.layers[name] = float((approx - w).norm() / w.norm().clamp(min=1e-30))
    if gram is not None:  # with G = X^T X: ||E X^T||^2 = trace(E G E^T)
        error, w = (approx - w).double(), w.double()
        energy = float((w @ gram * w).sum())
        result.output_errors[name] = float(((error @ gram * error).sum() / max(energy, 1e-300)) ** 0.5)


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
