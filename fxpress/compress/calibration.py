"""What the calibrated compressions share: each Linear's input Gram matrix ``X^T X`` (float64),
accumulated over a few batches of model inputs run through the uncompressed model.
``compress.svd`` whitens with it (SVD-LLM); ``compress.quantize`` weights BCQ's fit by its diagonal, or feeds it to GPTQ."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from fxpress.core.model_inputs import call_with
from fxpress.core.progress import progress
from fxpress.compress.sharded_linear import local_tensor


@torch.no_grad()
def input_grams(model: nn.Module, linears: dict[str, nn.Linear], batches: Iterable[Any],
                caller: str) -> dict[str, torch.Tensor]:
    """``{name: X^T X}`` for each of ``linears`` (modules of ``model``) over ``batches``: each a
    tensor, a tuple of positional arguments or a dict of keyword arguments for ``model``."""
    grams: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def accumulate(module: nn.Module, args: tuple) -> None:
            x = local_tensor(args[0]).detach()  # a tensor-parallel layer's input: this rank's part
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            grams[name] = grams.get(name, 0) + x.T @ x
        return accumulate

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears.items()]
    try:
        count = 0
        for batch in progress(batches, f"{caller.rsplit('.', 1)[-1]} calibration"):
            call_with(model, batch)
            count += 1
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        raise ValueError(f"{caller}: calibration= gave no batches")
    return grams
