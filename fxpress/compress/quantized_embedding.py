"""``QuantizedEmbedding``: a token embedding stored as low-bit bit-planes (``fxpress.lowbit``).

A lookup dequantises only the rows it reads (each token's bit-planes and its groups' scales), so
the table is never rebuilt in float. In a model whose output layer shares the embedding's weight
(tied), ``TiedQuantizedHead`` is the output layer over the embedding's own tensors: the table is
stored, counted and saved once (under the embedding's name), and captured, the head is the
dequantise-then-matmul pattern ``lut_matmul`` replaces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import fxpress.ops  # noqa: F401  (registers fxpress::dequantize_planes)
from fxpress.lowbit import BitPlaneWeight


class QuantizedEmbedding(nn.Module):
    def __init__(self, weight: BitPlaneWeight, padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.planes.shape[1], weight.in_features
        self.bits, self.group_size, self.padding_idx = weight.bits, weight.group_size, padding_idx
        self.register_buffer("planes", weight.planes)
        self.register_buffer("alpha", weight.alpha)
        self.register_buffer("beta", weight.beta)
        self.register_buffer("offset", weight.offset)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        offset = None if self.offset is None else self.offset[flat]
        rows = torch.ops.fxpress.dequantize_planes(self.planes[:, flat], self.alpha[flat], self.beta[flat],
                                                   self.embedding_dim, self.group_size, offset)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def weight(self) -> BitPlaneWeight:
        return BitPlaneWeight(self.planes, self.alpha, self.beta, self.embedding_dim, self.group_size, self.offset)

    def tie_head(self) -> "TiedQuantizedHead":
        return TiedQuantizedHead(self)

    def weight_nbytes(self) -> int:
        return self.weight().nbytes()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}"


class TiedQuantizedHead(nn.Module):
    """The output layer ``x @ table.T`` of a model whose ``QuantizedEmbedding`` holds the table.
    The embedding is referenced, not registered, so its tensors are not this module's."""

    def __init__(self, embedding: QuantizedEmbedding) -> None:
        super().__init__()
        self.__dict__["embedding"] = embedding  # bypasses nn.Module's registration on purpose
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings
        self.bits, self.group_size = embedding.bits, embedding.group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = self.embedding
        weight = torch.ops.fxpress.dequantize_planes(table.planes, table.alpha, table.beta, table.embedding_dim,
                                                     table.group_size, table.offset)
        return F.linear(x, weight.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied to the quantised embedding"
