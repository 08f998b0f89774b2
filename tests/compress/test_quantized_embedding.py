"""QuantizedEmbedding: a lookup dequantises exactly the rows it reads, and the tied output layer
computes with the same stored tensors."""

from __future__ import annotations

import torch

from fxpress import lowbit
from fxpress.compress.quantized_embedding import QuantizedEmbedding


def test_lookups_and_the_tied_head_use_the_dequantised_table():
    torch.manual_seed(0)
    stored = lowbit.rtn(torch.randn(100, 96), 4, 32).with_scales(torch.float16)
    table = stored.dequantize()
    embedding = QuantizedEmbedding(stored)
    ids = torch.randint(0, 100, (3, 7))
    assert torch.equal(embedding(ids), table[ids])
    head = embedding.tie_head()
    assert head.embedding is embedding and not list(head.state_dict())  # stored once, by the embedding
    x = torch.randn(5, 96)
    torch.testing.assert_close(head(x), x @ table.T)
    assert embedding.weight_nbytes() == stored.nbytes() < table.numel()  # under half its fp16 bytes
