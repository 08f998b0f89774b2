"""fxpress: a torch.compile backend and pass library for compressed transformer inference.

    compiled = torch.compile(model, backend="fxpress")
    compiled = torch.compile(model, backend=fxpress.backend(passes=[my_pass]))
    print(fxpress.explain(model, inputs))
    low_rank = fxpress.compress.svd(model, rank_ratio=0.5).model   # then compile it: fuse_low_rank
"""

from fxpress import compress

from fxpress.compiler.backend import Backend, FallbackWarning, backend
from fxpress.compiler.counters import counters
from fxpress.compiler.errors import FxpressError, OptionError, PassError, UnsupportedGraphError
from fxpress.compiler.explain import Report, explain
from fxpress.compiler.options import Options, Pass
from fxpress.compiler.pipeline import PIPELINE
from fxpress.compiler.plot import plot_memory

__version__ = "0.1.0"

__all__ = [
    "PIPELINE",
    "Backend",
    "FallbackWarning",
    "FxpressError",
    "OptionError",
    "Options",
    "Pass",
    "PassError",
    "Report",
    "UnsupportedGraphError",
    "backend",
    "compress",
    "counters",
    "explain",
    "plot_memory",
]
