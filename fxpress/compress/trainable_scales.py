"""A ``QuantizedLinear`` whose scales can train, for distillation: its bit-planes fixed as the
``+1 / -1`` signs they stand for, its ``alpha`` (one scale per group and plane) and ``beta`` (one
offset per group) trainable float32 parameters (as EfficientQAT and OmniQuant tune a quantised
model's step sizes with its codes frozen). The format does not change: ``write_back`` rounds the
trained scales into the layer's own buffers, in their own dtype, and the layer is what it was.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import fxpress.lowbit as lowbit
from fxpress.compress.quantized_linear import QuantizedLinear


def trainable(layer: nn.Module) -> bool:
    """Whether distillation can train ``layer``'s scales: BCQ bit-planes (not the exact uniform codes
    imported from a GGUF file, which keep their own offsets)."""
    return isinstance(layer, QuantizedLinear) and layer.offset is None


class TrainableScales(nn.Module):
    def __init__(self, layer: QuantizedLinear) -> None:
        super().__init__()
        self.layer = layer
        planes, n = layer.planes.shape[0], layer.out_features
        signs = lowbit.unpack(layer.planes).to(torch.float32) * 2 - 1  # [q, out, K_pad]
        self.register_buffer("signs", signs.view(planes, n, -1, layer.group_size))
        self.alpha = nn.Parameter(layer.alpha.detach().to(torch.float32).clone())  # [out, groups, q]
        self.beta = nn.Parameter(layer.beta.detach().to(torch.float32).clone())  # [out, groups]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.einsum("qngk,ngq->ngk", self.signs, self.alpha) + self.beta.unsqueeze(-1)
        w = w.reshape(w.shape[0], -1)[:, :self.layer.in_features]
        bias = self.layer.bias
        return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @torch.no_grad()
    def write_back(self) -> QuantizedLinear:
        """The original layer, holding the trained scales (rounded to its scale dtype)."""
        self.layer.alpha.copy_(self.alpha.to(self.layer.alpha.dtype))
        self.layer.beta.copy_(self.beta.to(self.layer.beta.dtype))
        return self.layer
