"""The decompositions capture applies: core ATen, minus the ops our passes match whole.

Lowering to the core ATen opset gives codegen a closed vocabulary of about 200 ops. A few ops are
kept whole on purpose, because a later pass or kernel family matches them as units:

- ``mm``/``addmm``/``bmm`` (low-rank chains, LUT matmul), never decomposed by core ATen anyway;
- every ``_scaled_dot_product_*`` attention (KV-cache compression, low-rank attention);
- ``native_layer_norm``, ``gelu``, ``_softmax`` (integer-only rewrites), ``silu`` (SwiGLU FFNs);
- ``index_copy``/``index_put`` (KV-cache updates: decomposed they become unreadable scatters).
"""

from __future__ import annotations

import torch
from torch._decomp import core_aten_decompositions

aten = torch.ops.aten

KEEP_WHOLE: frozenset[torch._ops.OpOverloadPacket] = frozenset(
    {
        aten.mm,
        aten.addmm,
        aten.bmm,
        aten.native_layer_norm,
        aten.gelu,
        aten._softmax,
        aten.silu,
        aten.index_copy,
        aten.index_copy_,
        aten.index_put,
        aten.index_put_,
        aten.scaled_dot_product_attention,
    }
)


def _kept(op: torch._ops.OpOverload) -> bool:
    packet = op.overloadpacket
    return packet in KEEP_WHOLE or packet.__name__.startswith("_scaled_dot_product")


DECOMPOSITIONS = {op: fn for op, fn in core_aten_decompositions().items() if not _kept(op)}
