"""``fxpress.fit``'s options for the token embedding: dense, or low-bit rows (``QuantizedEmbedding``).

In a small model the embedding is much of the weight (SmolLM2-135M: 28 M of 135 M parameters, 54
MiB at fp16), so a tight budget cannot be met without it. When the output layer shares its weight
(tied), a quantised table serves both, and both uses count in its error: the lookups' relative
squared error, weighted by how often the calibration tokens read each row, plus the output
layer's relative output error on its calibration inputs (``||(W' - W) X^T||^2 / ||W X^T||^2``).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import nn

import fxpress.lowbit as lowbit
from fxpress.compress.linear_layers import set_submodule
from fxpress.compress.quantized_embedding import QuantizedEmbedding


def find_embedding(model: nn.Module) -> tuple[str | None, str | None]:
    """The input embedding's module name, and the output layer's when it shares the embedding's weight."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    embedding = get_in() if callable(get_in) else None
    if not isinstance(embedding, nn.Embedding):
        return None, None
    head = get_out() if callable(get_out) else None
    names = {id(m): n for n, m in model.named_modules()}
    tied = isinstance(head, nn.Linear) and head.weight is embedding.weight
    return names[id(embedding)], names[id(head)] if tied else None


@torch.no_grad()
def embedding_options(embedding: nn.Embedding, head_gram: torch.Tensor | None, counts: torch.Tensor,
                      bits: Sequence[int], group_size: int, method: str,
                      ) -> Iterator[tuple[int, int, float, QuantizedEmbedding]]:
    """Per bit width: ``(bits, bytes, error, module)`` (module docstring)."""
    table = embedding.weight.detach().float()
    weights = counts.to(torch.float64)[:, None]
    for b in bits:
        importance = None if head_gram is None else torch.diagonal(head_gram)
        stored = (lowbit.rtn(table, b, group_size) if method == "rtn" else
                  lowbit.bcq(table, b, group_size, importance=importance)).with_scales(torch.float16)
        approx = stored.dequantize().double()
        error = float((weights * (approx - table.double()) ** 2).sum()
                      / (weights * table.double() ** 2).sum().clamp_min(1e-300))
        if head_gram is not None:
            delta, exact = approx - table.double(), table.double()
            error += float((delta @ head_gram * delta).sum() / (exact @ head_gram * exact).sum().clamp_min(1e-300))
        yield b, stored.nbytes(), error, QuantizedEmbedding(stored, embedding.padding_idx)


def install(model: nn.Module, name: str, head: str | None, embedding: QuantizedEmbedding) -> None:
    """Put ``embedding`` in ``model`` at ``name``, and its tied output layer at ``head``."""
    set_submodule(model, name, embedding)
    if head is not None:
        set_submodule(model, head, embedding.tie_head())
