"""Hand-written Triton kernels of the fxpress ops, each module with Python launchers taking the op's
arguments then ``out``. They import triton, so only generated wrappers import them (through the
ops' ``Launcher``s)."""
