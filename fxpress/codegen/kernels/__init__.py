"""Hand-written Triton kernels, one family per fxpress op, and how each op node is launched.

Kernel modules import triton, so this package is imported only by generated wrappers of the
triton target, never by fxpress itself.
"""


def dot_pad(n: int) -> int:
    """``n`` rounded up to a power of two of at least 16: the smallest ``tl.dot`` tile side."""
    import triton

    return max(16, triton.next_power_of_2(int(n)))
