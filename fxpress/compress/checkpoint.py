"""Saving and reloading low-rank models as safetensors files.

The factor shapes travel in the file's metadata (``fxpress.low_rank``: layer name -> rank), so a
reload needs only the dense model's architecture: ``load`` swaps in ``LowRankLinear`` layers of the
saved ranks, then loads every tensor strictly.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from fxpress.compress.layer_records import record as record_layers
from fxpress.compress.low_rank_linear import LowRankLinear
from fxpress.compress.linear_layers import set_submodule

METADATA_KEY = "fxpress.low_rank"


def save(model: nn.Module, path: str | Path) -> None:
    """Write every tensor of ``model`` and the ranks of its ``LowRankLinear`` layers to ``path``."""
    ranks = {name: m.rank for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    save_model(model, str(path), metadata={METADATA_KEY: json.dumps(ranks)})


def load(model: nn.Module, path: str | Path) -> nn.Module:
    """Turn the dense ``model`` into the low-rank model saved at ``path`` (in place) and return it."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if METADATA_KEY not in metadata:
        raise ValueError(f"{path}: not an fxpress low-rank checkpoint (no {METADATA_KEY!r} metadata)")
    for name, rank in json.loads(metadata[METADATA_KEY]).items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path}: layer {name!r} of the checkpoint is not in the model") from None
        if type(layer) is not nn.Linear:
            raise ValueError(f"{path}: layer {name!r} is a {type(layer).__name__}, expected nn.Linear")
        set_submodule(model, name, LowRankLinear(
            layer.in_features, layer.out_features, rank, bias=layer.bias is not None,
            device=layer.weight.device, dtype=layer.weight.dtype))
    load_model(model, str(path), strict=True)
    record_layers(model)
    return model
