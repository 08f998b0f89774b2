"""Triton kernels of the KV stores on CUDA: KIVI quantisation and split decode attention, H2O's fused
eviction step. Imported lazily by the stores that use them."""
