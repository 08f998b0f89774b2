"""The IR vocabulary: ``torch.ops.fxpress.*``. Importing this package registers every op."""

from fxpress.ops._define import OPS, OpSpec, define_op
from fxpress.ops.rms_norm import rms_norm

__all__ = ["OPS", "OpSpec", "define_op", "rms_norm"]
