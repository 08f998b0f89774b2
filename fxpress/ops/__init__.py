"""The IR vocabulary: ``torch.ops.fxpress.*``. Importing this package registers every op."""

from fxpress.ops._define import OPS, OpSpec, define_op
from fxpress.ops.kv_attend import kv_attend
from fxpress.ops.lowrank import lowrank_attention, lowrank_ffn, lowrank_linear
from fxpress.ops.rms_norm import rms_norm

__all__ = ["OPS", "OpSpec", "define_op", "kv_attend", "lowrank_attention", "lowrank_ffn", "lowrank_linear", "rms_norm"]
