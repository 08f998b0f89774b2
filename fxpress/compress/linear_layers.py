"""The layers fxpress compresses as Linear: ``nn.Linear``, and transformers' ``Conv1D`` (GPT-2's
projections: a Linear whose weight is stored transposed, ``[in, out]``)."""

from __future__ import annotations

import fnmatch
from typing import Iterable

import torch
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D``, recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers.") \
        and getattr(module, "weight", None) is not None and module.weight.dim() == 2


@torch.no_grad()
def as_linear(conv1d: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` computing what ``conv1d`` computes (``x @ W + b`` = ``x @ W.T.T + b``)."""
    n_in, n_out = conv1d.weight.shape
    linear = nn.Linear(n_in, n_out, bias=conv1d.bias is not None, device=conv1d.weight.device,
                       dtype=conv1d.weight.dtype)
    linear.weight.copy_(conv1d.weight.t())
    if conv1d.bias is not None:
        linear.bias.copy_(conv1d.bias)
    linear.train(conv1d.training)
    return linear


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def matching_linears(model: nn.Module, targets: Iterable[str], skip: Iterable[str] = ()) -> dict[str, nn.Linear]:
    """The Linear layers of ``model`` whose names match a ``targets`` glob and no ``skip`` glob.
    Matching ``Conv1D`` layers are replaced in ``model`` (a copy the caller made) by equal
    ``nn.Linear`` layers first, so they are compressed like any other."""
    targets, skip = list(targets), list(skip)
    found = {}
    for name, module in list(model.named_modules()):
        if not any(fnmatch.fnmatchcase(name, p) for p in targets) or any(fnmatch.fnmatchcase(name, p) for p in skip):
            continue
        if is_conv1d(module):
            module = as_linear(module)
            set_submodule(model, name, module)
        if type(module) is nn.Linear:
            found[name] = module
    return found
