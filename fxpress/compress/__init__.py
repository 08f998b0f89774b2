"""Model compression that produces the graphs fxpress's passes fuse.

    result = fxpress.compress.svd(model, rank_ratio=0.5)
    print(result)                      # parameters kept, per-layer error
    fxpress.compress.save(result.model, "model.safetensors")
    model = fxpress.compress.load(dense_model, "model.safetensors")
"""

from fxpress.compress.checkpoint import load, save
from fxpress.compress.low_rank_linear import LowRankLinear
from fxpress.compress.svd import LayerReport, SVDResult, svd

__all__ = ["LayerReport", "LowRankLinear", "SVDResult", "load", "save", "svd"]
