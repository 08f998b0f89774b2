"""Compressing the Linear layers of a tensor-parallel model: each rank compresses its own shard.

``torch.distributed.tensor.parallel.parallelize_module`` leaves a sharded layer an ``nn.Linear``
whose weight is a DTensor (``ColwiseParallel``: rows, ``Shard(0)``; ``RowwiseParallel``: columns,
``Shard(1)``) and whose forward hooks move activations between layouts. The compressions take
:func:`local_shard` (a plain Linear over this rank's rows or columns), compress it like any other
layer, and put the result back inside a :class:`ShardedLayer`: it keeps the original hooks, runs
the compressed layer on local tensors, and hands the hooks a DTensor of the placement the dense
layer's output had (a column-parallel layer's output is sharded on features; a row-parallel one's
is a partial sum, which the hook all-reduces). torch.distributed does every communication, and a
compiled graph sees the compressed layer's own ops (``lut_matmul`` and ``fuse_low_rank`` apply
per shard) between the functional collectives.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

try:  # torch.distributed is optional in torch builds
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
except ImportError:  # pragma: no cover - a torch without distributed
    DTensor = None


class ShardingError(ValueError):
    """A sharded layer fxpress cannot compress, and why."""


def local_tensor(x: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor; any other tensor as it is."""
    return x.to_local() if DTensor is not None and isinstance(x, DTensor) else x


def is_sharded(linear: nn.Module) -> bool:
    return DTensor is not None and isinstance(getattr(linear, "weight", None), DTensor)


class ShardedLayer(nn.Module):
    """One rank's compressed shard of a tensor-parallel Linear (``inner``), between the layer's
    original forward hooks. ``bias`` is a row-parallel layer's bias, added once after the sum."""

    def __init__(self, inner: nn.Module, mesh, output_placements: tuple, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.inner = inner
        self.mesh = mesh
        self.output_placements = output_placements
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = DTensor.from_local(self.inner(local_tensor(x)), self.mesh, self.output_placements, run_check=False)
        if self.bias is not None:  # a partial sum: reduce first, so the bias is added once
            y = y.redistribute(self.mesh, [Replicate()])
            y = DTensor.from_local(y.to_local() + self.bias, self.mesh, [Replicate()], run_check=False)
        return y

    def extra_repr(self) -> str:
        return f"mesh={tuple(self.mesh.mesh.shape)}, output={self.output_placements}"


def local_shard(linear: nn.Linear, name: str) -> tuple[nn.Linear, Callable[[nn.Module], nn.Module]]:
    """``(the plain Linear this rank computes, wrap)``: ``wrap(compressed)`` is the layer to put
    in ``linear``'s place. For a layer that is not sharded: ``(linear, the identity)``."""
    if not is_sharded(linear):
        return linear, lambda compressed: compressed
    weight = linear.weight
    placements = tuple(weight.placements)
    if weight.device_mesh.ndim != 1 or len(placements) != 1:
        raise ShardingError(f"{name}: only 1-D device meshes are supported, its weight is placed {placements}")
    placement = placements[0]
    bias = linear.bias
    local_bias = bias.to_local() if isinstance(bias, DTensor) else bias
    if isinstance(placement, Shard) and placement.dim == 0:  # column-parallel: this rank's output features
        output, kept_bias, outer_bias = (Shard(-1),), local_bias, None
    elif isinstance(placement, Shard) and placement.dim == 1:  # row-parallel: a partial sum of the output
        output, kept_bias, outer_bias = (Partial(),), None, local_bias
    elif isinstance(placement, Replicate):
        output, kept_bias, outer_bias = (Replicate(),), local_bias, None
    else:
        raise ShardingError(f"{name}: weight placement {placement} is not Shard(0), Shard(1) or Replicate()")
    local_weight = weight.to_local().detach()
    plain = nn.Linear(local_weight.shape[1], local_weight.shape[0], bias=kept_bias is not None,
                      device=local_weight.device, dtype=local_weight.dtype)
    with torch.no_grad():
        plain.weight.copy_(local_weight)
        if kept_bias is not None:
            plain.bias.copy_(kept_bias)
    plain.train(linear.training)
    mesh = weight.device_mesh

    def wrap(compressed: nn.Module) -> nn.Module:
        layer = ShardedLayer(compressed, mesh, output, None if outer_bias is None else outer_bias.detach().clone())
        _move_hooks(linear, layer)
        return layer

    return plain, wrap


def _move_hooks(source: nn.Module, target: nn.Module) -> None:
    """The forward hooks ``parallelize_module`` put on ``source`` (layout changes), on ``target``."""
    for attr in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                 "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
        getattr(target, attr).update(getattr(source, attr))
