"""The FXPRESS_DEBUG ladder, mapped onto loggers.

1: one line per compiled graph (``fxpress``); 2: also the graph after each pass that changed it
(``fxpress.graphs``); 3: also each generated wrapper module with its Triton kernels
(``fxpress.kernels``); 4: also every refused rewrite and why (``fxpress.passes``).
"""

from __future__ import annotations

import logging

from fxpress.core import flags

compile_log = logging.getLogger("fxpress")
graph_log = logging.getLogger("fxpress.graphs")
kernel_log = logging.getLogger("fxpress.kernels")
rule_log = logging.getLogger("fxpress.passes")


def configure_from_flags() -> None:
    level = flags.DEBUG.get()
    if not level or compile_log.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    compile_log.addHandler(handler)
    compile_log.setLevel(logging.INFO)
    graph_log.setLevel(logging.DEBUG if level >= 2 else logging.INFO)
    kernel_log.setLevel(logging.DEBUG if level >= 3 else logging.INFO)
    rule_log.setLevel(logging.DEBUG if level >= 4 else logging.INFO)
