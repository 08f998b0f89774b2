"""Model compression that produces the graphs fxpress's passes fuse.

    result = fxpress.compress.svd(model, rank_ratio=0.5)
    print(result)                      # parameters kept, per-layer error
    fxpress.compress.save(result.model, "model.safetensors")
    model = fxpress.compress.load(dense_model, "model.safetensors")
    result = fxpress.compress.quantize(model, bits=3, method="bcq")   # then compile it: lut_matmul
"""

from fxpress.compress.checkpoint import load, save
from fxpress.lowbit import BitPlaneWeight, QuantizeError
from fxpress.compress.quantize import QuantizeResult, load_gguf, quantize
from fxpress.compress.quantized_linear import QuantizedLinear
from fxpress.compress.low_rank_linear import LowRankLinear
from fxpress.compress.svd import LayerReport, SVDResult, svd

__all__ = ["BitPlaneWeight", "LayerReport", "LowRankLinear", "QuantizeError", "QuantizeResult", "QuantizedLinear",
           "SVDResult", "load", "load_gguf", "quantize", "save", "svd"]
