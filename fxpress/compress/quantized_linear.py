"""``QuantizedLinear``: a Linear layer stored as low-bit bit-planes (``fxpress.lowbit``).

Its forward is dequantise-then-matmul in plain torch (``fxpress::dequantize_planes`` then
``F.linear``), so the module runs without fxpress, and captured it is the pattern ``lut_matmul``
replaces by ``fxpress::lut_linear``, which never materialises the dequantised weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import fxpress.ops  # noqa: F401  (registers fxpress::dequantize_planes)
from fxpress.lowbit import BitPlaneWeight


class QuantizedLinear(nn.Module):
    def __init__(self, weight: BitPlaneWeight, bias: torch.Tensor | None, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.in_features, out_features
        self.bits, self.group_size = weight.bits, weight.group_size
        self.register_buffer("planes", weight.planes)
        self.register_buffer("alpha", weight.alpha)
        self.register_buffer("beta", weight.beta)
        self.register_buffer("offset", weight.offset)  # None unless imported: then exact dequantisation
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = torch.ops.fxpress.dequantize_planes(self.planes, self.alpha, self.beta, self.in_features,
                                                     self.group_size, self.offset)
        return F.linear(x, weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def weight_nbytes(self) -> int:
        kept = (self.planes, self.alpha, self.beta) + (() if self.offset is None else (self.offset,))
        return sum(t.numel() * t.element_size() for t in kept)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}")
