"""The IR vocabulary: ``torch.ops.fxpress.*``. Importing this package registers every op.

Each op file defines its ops with ``define_op``: schema, shape rule, reference, and per target the
kernel that runs it (``fxpress.ops.lowering.Launcher``); kernels live in ``fxpress/ops/kernels/``.
"""

from fxpress.ops._define import OPS, OpSpec, define_op, op_spec
from fxpress.ops.cache_attend import cache_attend, cache_bind
from fxpress.ops.integer import (int_gelu, int_gelu_scale, int_layer_norm, int_quantize,
                                 int_row_scale, int_softmax)
from fxpress.ops.kv_attend import kv_attend
from fxpress.ops.lut import dequantize_planes, lut_linear
from fxpress.ops.lowrank import lowrank_attention, lowrank_ffn, lowrank_linear
from fxpress.ops.rms_norm import rms_norm

__all__ = ["OPS", "OpSpec", "define_op", "op_spec", "cache_attend", "cache_bind", "int_gelu", "int_gelu_scale",
           "int_layer_norm", "int_quantize", "int_row_scale", "int_softmax", "dequantize_planes", "kv_attend",
           "lut_linear", "lowrank_attention", "lowrank_ffn", "lowrank_linear", "rms_norm"]
