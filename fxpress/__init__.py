"""fxpress: a torch.compile backend and pass library for compressed transformer inference.

    compiled = torch.compile(model, backend="fxpress")
    compiled = torch.compile(model, backend=fxpress.backend(passes=[my_pass]))
    print(fxpress.explain(model, inputs))
    fxpress.aot_compile(model, (x,), "model.fxpress"); loaded = fxpress.load("model.fxpress")
    low_rank = fxpress.compress.svd(model, rank_ratio=0.5).model   # then compile it: fuse_low_rank
    cache = fxpress.kv_cache(model, max_len=4096, policy=fxpress.KIVI(bits=2))  # for generate()
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from fxpress.core.version import VERSION

__version__ = VERSION

# Public names and the modules that define them. Imported on first use (PEP 562) when torch is not
# loaded yet, so that the command line's ``--help`` and ``--version`` do not pay for it; the first
# name used imports them all, so that fxpress's ops are registered with torch whichever comes first.
# A program that has imported torch gets everything at ``import fxpress`` (see the end of this
# file), so ``torch.ops.fxpress.*`` exist right after it, as they always did.
_EXPORTS = {
    "compress": ("fxpress.compress", None),
    "kv": ("fxpress.kv", None),
    "workloads": ("fxpress.workloads", None),
    "aot_compile": ("fxpress.compiler.aot", "aot_compile"),
    "LoadedModel": ("fxpress.compiler.load", "LoadedModel"),
    "load": ("fxpress.compiler.load", "load"),
    "ArtifactError": ("fxpress.compiler.artifact", "ArtifactError"),
    "Backend": ("fxpress.compiler.backend", "Backend"),
    "FallbackWarning": ("fxpress.compiler.backend", "FallbackWarning"),
    "CudaGraphWarning": ("fxpress.runtime.cuda_graphs", "CudaGraphWarning"),
    "backend": ("fxpress.compiler.backend", "backend"),
    "counters": ("fxpress.core.counters", "counters"),
    "FxpressError": ("fxpress.core.errors", "FxpressError"),
    "OptionError": ("fxpress.core.errors", "OptionError"),
    "PassError": ("fxpress.core.errors", "PassError"),
    "UnsupportedGraphError": ("fxpress.core.errors", "UnsupportedGraphError"),
    "IntegerError": ("fxpress.core.errors", "IntegerError"),
    "KVCacheError": ("fxpress.core.errors", "KVCacheError"),
    "Report": ("fxpress.compiler.explain", "Report"),
    "explain": ("fxpress.compiler.explain", "explain"),
    "Options": ("fxpress.ir.options", "Options"),
    "Pass": ("fxpress.ir.options", "Pass"),
    "PIPELINE": ("fxpress.compiler.pipeline", "PIPELINE"),
    "plot_memory": ("fxpress.compiler.plot", "plot_memory"),
    "calibrate_integer": ("fxpress.compiler.calibrate", "calibrate_integer"),
    "IntegerCalibration": ("fxpress.integer.calibration", "IntegerCalibration"),
    "IntegerOnly": ("fxpress.integer.config", "IntegerOnly"),
    "KIVI": ("fxpress.kv.policies", "KIVI"),
    "DuoAttentionKV": ("fxpress.kv.policies", "DuoAttentionKV"),
    "FullKV": ("fxpress.kv.policies", "FullKV"),
    "HeavyHitterKV": ("fxpress.kv.policies", "HeavyHitterKV"),
    "StreamingKV": ("fxpress.kv.policies", "StreamingKV"),
    "ThinKV": ("fxpress.kv.policies", "ThinKV"),
    "fit": ("fxpress.hf.fit", "fit"),
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fxpress' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    if attr is None and module in sys.modules:  # a subpackage asked for while it is being imported
        return sys.modules[module]
    for public, (module, attr) in _EXPORTS.items():
        value = importlib.import_module(module)
        globals()[public] = value if attr is None else getattr(value, attr)
    return globals()[name]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "ArtifactError",
    "KIVI",
    "KVCacheError",
    "PIPELINE",
    "Backend",
    "DuoAttentionKV",
    "FallbackWarning",
    "CudaGraphWarning",
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
    "ThinKV",
    "UnsupportedGraphError",
    "aot_compile",
    "backend",
    "calibrate_integer",
    "compress",
    "counters",
    "explain",
    "fit",
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


if "torch" in sys.modules:  # a library user, not the command line starting up
    __getattr__("backend")
