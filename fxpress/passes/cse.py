"""Pass cse: common-subexpression elimination (torch.fx's CSEPass, told which ops must stay).

fx's CSEPass assumes a functional graph; ours ends with in-place updates of user state (``copy_``
into a StaticCache buffer) and may hold random ops, so every op whose schema writes an argument,
or that is seeded-random, or a collective, is banned from merging. Before/after::

    %a = aten.view(%x, [1, 576]); %b = aten.view(%x, [1, 576])
    %q = aten.mm(%a, %wq); %k = aten.mm(%b, %wk)   ->   %q = aten.mm(%a, %wq); %k = aten.mm(%a, %wk)
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.dialect.common.cse_pass import CSEPass, get_CSE_banned_ops
from torch.fx.passes.infra.pass_base import PassResult

from fxpress.core.counters import counters
from fxpress.ir.collectives import NAMESPACE as COLLECTIVES
from fxpress.ir.options import Options


def _must_not_merge(node: fx.Node) -> bool:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        if target.namespace == COLLECTIVES:  # each one is a communication all ranks take part in
            return True
        writes = any(a.alias_info is not None and a.alias_info.is_write for a in target._schema.arguments)
        return writes or torch.Tag.nondeterministic_seeded in target.tags
    return node.is_impure()


def cse(gm: fx.GraphModule, *, opts: Options) -> PassResult:
    banned = set(get_CSE_banned_ops())
    for node in gm.graph.nodes:
        if node.op == "call_function" and _must_not_merge(node):
            banned.add(getattr(node.target, "overloadpacket", node.target))
    before = len(gm.graph.nodes)
    result = CSEPass(banned_ops=banned)(gm)
    new_gm = result.graph_module
    new_gm.graph.eliminate_dead_code()
    new_gm.recompile()
    removed = before - len(new_gm.graph.nodes)
    if removed:
        counters["cse"]["nodes merged"] += removed
    return PassResult(new_gm, removed > 0)
