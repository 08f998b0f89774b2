"""Hand-written Triton kernels, one family per fxpress op, and how each op node is launched.

Kernel modules import triton, so this package is imported only by generated wrappers of the
triton target, never by fxpress itself.
"""
