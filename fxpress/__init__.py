"""fxpress: a torch.compile backend and pass library for compressed transformer inference.

    compiled = torch.compile(model, backend="fxpress")
    compiled = torch.compile(model, backend=fxpress.backend(passes=[my_pass]))
    print(fxpress.explain(model, inputs))
    fxpress.aot_compile(model, (x,), "model.fxpress"); loaded = fxpress.load("model.fxpress")
    low_rank = fxpress.compress.svd(model, rank_ratio=0.5).model   # then compile it: fuse_low_rank
    cache = fxpress.kv_cache(model, max_len=4096, policy=fxpress.KIVI(bits=2))  # for generate()
"""

from typing import Any

from fxpress import compress, kv

from fxpress.compiler.aot import aot_compile
from fxpress.compiler.load import LoadedModel, load
from fxpress.compiler.artifact import ArtifactError
from fxpress.compiler.backend import Backend, FallbackWarning, backend
from fxpress.core.counters import counters
from fxpress.core.errors import FxpressError, OptionError, PassError, UnsupportedGraphError
from fxpress.compiler.explain import Report, explain
from fxpress.ir.options import Options, Pass
from fxpress.compiler.pipeline import PIPELINE
from fxpress.compiler.plot import plot_memory
from fxpress.core.version import VERSION
from fxpress.compiler.calibrate import calibrate_integer
from fxpress.integer.calibration import IntegerCalibration
from fxpress.core.errors import IntegerError
from fxpress.integer.config import IntegerOnly
from fxpress.kv.policies import KIVI, DuoAttentionKV, FullKV, HeavyHitterKV, StreamingKV

__version__ = VERSION

__all__ = [
    "ArtifactError",
    "KIVI",
    "PIPELINE",
    "Backend",
    "DuoAttentionKV",
    "FallbackWarning",
    "FullKV",
    "FxpressError",
    "HeavyHitterKV",
    "IntegerCalibration",
    "IntegerError",
    "IntegerOnly",
    "LoadedModel",
    "OptionError",
    "Options",
    "Pass",
    "PassError",
    "Report",
    "StreamingKV",
    "UnsupportedGraphError",
    "aot_compile",
    "backend",
    "calibrate_integer",
    "compress",
    "counters",
    "explain",
    "kv",
    "kv_cache",
    "load",
    "plot_memory",
]


def kv_cache(model: Any, max_len: int, policy: Any, **kwargs: Any) -> Any:
    """A compressed KV cache for ``model.generate``; see :func:`fxpress.hf.kv_cache.kv_cache`.
    transformers is imported on the first call."""
    from fxpress.hf.kv_cache import kv_cache as make

    return make(model, max_len, policy, **kwargs)
