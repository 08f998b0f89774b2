"""What every Triton kernel of fxpress shares, generated or hand-written: the dtypes they take and
the smallest ``tl.dot`` tile. Imports triton only when a tile size is asked for."""

from __future__ import annotations

import torch

# torch dtype -> its triton.language name, for the dtypes fxpress's Triton kernels read and write.
TL_DTYPES = {torch.float32: "tl.float32", torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16",
             torch.bool: "tl.int1"}


def dot_pad(n: int) -> int:
    """``n`` rounded up to a power of two of at least 16: the smallest ``tl.dot`` tile side."""
    import triton

    return max(16, triton.next_power_of_2(int(n)))
