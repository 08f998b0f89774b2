"""``LowRankLinear``: a Linear layer stored as two thin factors, ``up(down(x))``.

The module is written as two plain ``nn.Linear`` calls on purpose: captured, it is the chain
``linear(linear(x, W_down), W_up, b)`` that ``fuse_low_rank`` looks for, and without fxpress it runs
as an ordinary (unfused) low-rank model.
"""

from __future__ import annotations

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """``y = x @ down.weight.T @ up.weight.T + up.bias`` with ``down: in -> rank``, ``up: rank -> out``."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if not 0 < rank <= min(in_features, out_features):
            raise ValueError(
                f"LowRankLinear: rank must be in 1..{min(in_features, out_features)} for a "
                f"{in_features}->{out_features} layer, got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
