"""A compressed model's layers as plain data, and the empty layers rebuilt from it.

Every compression (``svd``, ``quantize``, ``load_gguf``, ``load``) ends by recording, on a
transformers model, ``config.quantization_config = {"quant_method": "fxpress", "layers": {...}}``:
per compressed layer its kind and shapes. ``save_pretrained`` writes it into ``config.json`` with
the weights in safetensors; ``from_pretrained`` hands it to fxpress's registered quantizer
(``fxpress.hf.quantizer``), which calls ``rebuild`` on the empty model before the weights are read,
so every stored tensor (bit-planes, scales, factors) lands in a layer of its own shape.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fxpress import lowbit
from fxpress.compress.linear_layers import is_conv1d, set_submodule
from fxpress.compress.low_rank_linear import LowRankLinear
from fxpress.compress.quantized_embedding import QuantizedEmbedding, TiedQuantizedHead
from fxpress.compress.quantized_linear import QuantizedLinear

METHOD = "fxpress"  # transformers' quant_method


def describe(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{layer name: record}`` for every ``QuantizedLinear``, ``LowRankLinear``,
    ``QuantizedEmbedding`` and ``TiedQuantizedHead`` of ``model``."""
    layers: dict[str, dict[str, Any]] = {}
    names = {id(module): name for name, module in model.named_modules()}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedEmbedding):
            layers[name] = {"kind": "lowbit_embedding", "in_features": module.embedding_dim,
                            "out_features": module.num_embeddings, "bits": module.bits,
                            "group_size": module.group_size, "bias": False, "offset": module.offset is not None,
                            "scale_dtype": str(module.alpha.dtype)[6:], "padding_idx": module.padding_idx}
        elif isinstance(module, TiedQuantizedHead):
            layers[name] = {"kind": "tied_lowbit_head", "in_features": module.in_features,
                            "out_features": module.out_features, "bias": False,
                            "embedding": names[id(module.embedding)]}
        elif isinstance(module, QuantizedLinear):
            layers[name] = {"kind": "lowbit", "in_features": module.in_features, "out_features": module.out_features,
                            "bits": module.bits, "group_size": module.group_size, "bias": module.bias is not None,
                            "offset": module.offset is not None, "scale_dtype": str(module.alpha.dtype)[6:]}
        elif isinstance(module, LowRankLinear):
            layers[name] = {"kind": "lowrank", "in_features": module.in_features,
                            "out_features": module.out_features, "rank": module.rank,
                            "bias": module.up.bias is not None}
    return layers


def record(model: nn.Module) -> None:
    """Keep ``describe(model)`` in a transformers model's config (nothing for other modules)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        return
    layers = describe(model)
    if not layers:
        return
    config.quantization_config = {"quant_method": METHOD, "layers": layers}
    # A compressed output layer no longer shares the input embedding's weight: said in the config,
    # or loading would tie the two again (and look for the output layer's dense weight).
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(output, (QuantizedLinear, LowRankLinear, TiedQuantizedHead)) and \
            getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False


def _empty(name: str, record: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """The compressed layer ``record`` describes, its tensors allocated but not filled."""
    try:
        kind, n_in, n_out, bias = record["kind"], int(record["in_features"]), int(record["out_features"]), \
            bool(record["bias"])
        if kind == "lowbit":
            bias_tensor = torch.empty(n_out, dtype=dtype) if bias else None
            return QuantizedLinear(_empty_planes(record, n_in, n_out), bias_tensor, n_out)
        if kind == "lowbit_embedding":
            return QuantizedEmbedding(_empty_planes(record, n_in, n_out), record.get("padding_idx"))
        if kind == "lowrank":
            return LowRankLinear(n_in, n_out, int(record["rank"]), bias=bias, dtype=dtype)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"quantization_config layer {name!r}: bad record {record!r} ({e})") from None
    raise ValueError(f"quantization_config layer {name!r}: unknown kind {kind!r} "
                     "(expected 'lowbit', 'lowrank', 'lowbit_embedding' or 'tied_lowbit_head')")


def _empty_planes(record: dict[str, Any], n_in: int, n_out: int) -> lowbit.BitPlaneWeight:
    bits, group = int(record["bits"]), int(record["group_size"])
    lowbit.check_format(bits, group, n_in)
    groups = lowbit.padded(n_in, group) // group
    scales = {str(d)[6:]: d for d in lowbit.SCALE_DTYPES}[record.get("scale_dtype", "float32")]
    offset = torch.empty(n_out, groups, dtype=scales) if record.get("offset") else None
    return lowbit.BitPlaneWeight(torch.empty(bits, n_out, groups * group // 32, dtype=torch.int32),
                                 torch.empty(n_out, groups, bits, dtype=scales),
                                 torch.empty(n_out, groups, dtype=scales), n_in, group, offset)


def rebuild(model: nn.Module, layers: dict[str, dict[str, Any]], dtype: torch.dtype = torch.float32) -> None:
    """Replace each Linear (or transformers Conv1D, or Embedding) of ``model`` named in ``layers`` by
    the empty compressed layer its record describes, after checking that the shapes agree; then
    tie each output layer recorded as sharing a quantised embedding to it."""
    tied = {name: record for name, record in layers.items() if record.get("kind") == "tied_lowbit_head"}
    for name, record in layers.items():
        layer = _layer(model, name)
        if isinstance(layer, nn.Embedding) and record.get("kind") == "lowbit_embedding":
            shape = (layer.embedding_dim, layer.num_embeddings)
        elif type(layer) is nn.Linear and record.get("kind") != "lowbit_embedding":
            shape = (layer.in_features, layer.out_features)
        elif is_conv1d(layer) and record.get("kind") != "lowbit_embedding":
            shape = tuple(layer.weight.shape)
        else:
            raise ValueError(f"quantization_config layer {name!r} is a {type(layer).__name__}, which a "
                             f"{record.get('kind')!r} record does not describe")
        if shape != (record.get("in_features"), record.get("out_features")):
            raise ValueError(f"quantization_config layer {name!r}: the model's layer is {shape[0]} -> {shape[1]}, "
                             f"the record {record.get('in_features')} -> {record.get('out_features')}")
        if name not in tied:
            set_submodule(model, name, _empty(name, record, dtype))
    for name, record in tied.items():
        embedding = _layer(model, str(record.get("embedding")))
        if not isinstance(embedding, QuantizedEmbedding):
            raise ValueError(f"quantization_config layer {name!r} is tied to {record.get('embedding')!r}, which is "
                             f"not recorded as a quantised embedding")
        set_submodule(model, name, embedding.tie_head())


def _layer(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"quantization_config layer {name!r} is not in the {type(model).__name__}") from None
