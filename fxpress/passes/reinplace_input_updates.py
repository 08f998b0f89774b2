"""Pass reinplace_input_updates: write a user's state in place instead of copying it back whole.

Capture makes the graph functional, so a StaticCache update ``cache.index_copy_(2, pos, k)`` comes
out as a fresh full-size ``index_copy`` plus a ``copy_`` of all of it into the cache at the end.
Where the cache has no other reader, the functional op and the copy become the in-place op, which
touches only the new rows. Documented mutation: the new node writes the graph input it names.
Last in the pipeline, so rewrites before it see only functional ops. Before/after::

    %new = aten.index_copy(%cache, 2, %pos, %k)      %new = aten.index_copy_(%cache, 2, %pos, %k)
    %o = sdpa(%q, %new, ...)                    ->   %o = sdpa(%q, %new, ...)
    copy_(%cache, %new)
"""

from __future__ import annotations

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from fxpress.ir.options import Options
from fxpress.ir.match import Match, Miss, Rule, apply_rules, aten, is_op

# functional op -> the in-place op with the same arguments
_INPLACE = {
    aten.index_copy.default: aten.index_copy_.default,
    aten.index_put.default: aten.index_put_.default,
}


def _match(copy: fx.Node) -> Match | Miss | None:
    if not is_op(copy, aten.copy_):
        return None
    state, update = copy.args[:2]
    if not (isinstance(state, fx.Node) and state.op == "placeholder"):
        return None
    if not (isinstance(update, fx.Node) and update.target in _INPLACE and update.args[0] is state):
        return Miss(copy, f"{getattr(update, 'target', update)} has no in-place form here")
    if set(state.users) != {update, copy}:
        return Miss(copy, "the old value of the state is read elsewhere")
    if any(u.op == "output" for u in update.users):
        return Miss(copy, "the updated state is also a graph output")
    return Match(root=update, nodes=[update, copy])


def _replace(gm: fx.GraphModule, m: Match) -> fx.Node:
    update = m.root
    with gm.graph.inserting_before(update):
        node = gm.graph.call_function(_INPLACE[update.target], update.args, update.kwargs)
    node.meta.update(update.meta)
    # The in-place op has already written the state, so the copy back is redundant.
    copy = next(u for u in update.users if is_op(u, aten.copy_))
    gm.graph.erase_node(copy)
    m.nodes.remove(copy)
    return node


RULES = (Rule("copy_(s, op(s, ...)) => op_(s, ...)", _match, _replace),)


def reinplace_input_updates(gm: fx.GraphModule, *, opts: Options) -> PassResult:
    return PassResult(gm, apply_rules(gm, RULES, "reinplace_input_updates") > 0)
