"""Pass remove_dead_code: erase nodes whose results nobody uses (first in the pipeline).

Side-effecting nodes (``copy_`` into a user's cache, say) are kept: fx's ``is_impure`` reads
each op's schema. Before/after::

    %t = aten.t(%w)            # unused
    %y = aten.mm(%x, %w2)      ->   %y = aten.mm(%x, %w2)
"""

from __future__ import annotations

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from fxpress.core.counters import counters
from fxpress.ir.options import Options


def remove_dead_code(gm: fx.GraphModule, *, opts: Options) -> PassResult:
    before = len(gm.graph.nodes)
    modified = gm.graph.eliminate_dead_code()
    if modified:
        counters["remove_dead_code"]["nodes removed"] += before - len(gm.graph.nodes)
        gm.recompile()
    return PassResult(gm, modified)
