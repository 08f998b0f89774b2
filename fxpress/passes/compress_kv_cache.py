"""Pass compress_kv_cache: KV caches kept in fixed buffers become compressed state + one op.

Runs only when a policy is given (``fxpress.backend(kv=fxpress.KIVI(bits=2))``): compression
changes numbers and is never applied silently. It finds, per attention layer, a cache update
feeding attention, whichever way the model wrote it:

- HF ``StaticCache``: ``aten.index_copy(cache, 2, cache_position, k)``;
- gpt-fast style ``cache[:, :, pos] = k``: ``aten.index_put(cache, [None, None, pos], k)``;

(either one possibly sliced to the prefill length) for both K and V with the same positions, read
by SDPA. Before/after::

    %kc = index_copy(%k_cache, 2, %pos, %k)
    %vc = index_copy(%v_cache, 2, %pos, %v)
    %o = sdpa(%q, %kc, %vc, %mask)          ->   %o = fxpress.kv_attend(%q, %k, %v, %pos, %mask, %k_cache,
                                                                         handle, scale)
    copy_(%k_cache, %kc) ...                     (the buffers are no longer written)

The compressed state (``fxpress.kv.graph_state``) belongs to the model's key buffer of the layer:
the prefill and the decode graph of a model (two compiles) reach the same state through it, and two
caches (interleaved requests, two models) never share one. It persists across calls and restarts
when a call writes position 0. Grouped-query attention and batches are
native to the op. The model's full-precision buffers stay allocated (the model made them); to
avoid them, build the cache with ``fxpress.kv_cache``.
"""

from __future__ import annotations

import warnings
from functools import partial

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from fxpress.core.counters import counters
from fxpress.ir.options import Options
from fxpress.kv import graph_state
from fxpress.kv.policy_checks import check_head_dim
from fxpress.kv.registry import Policy
from fxpress.ops import kv_attend
from fxpress.ir.match import (Match, Miss, Rule, SDPA_OPS, apply_rules, aten, is_op, sdpa_arguments,
                                   sdpa_result, val)

RULE = "cache update -> sdpa => kv_attend"
NOTHING_FOUND = ("compress_kv_cache found no scaled_dot_product_attention reading a cache, so nothing is compressed "
                 "(a model with eager attention? load it with attn_implementation='sdpa')")


def _strip_repeat_kv(node: fx.Node, taken: list[fx.Node]) -> fx.Node:
    """transformers' ``repeat_kv`` for grouped-query attention with a mask:
    ``view(clone(expand(unsqueeze(x, 2))))`` -> ``x`` (kv_attend groups the query heads itself)."""
    chain, at = [], node
    if is_op(at, aten.view, aten.reshape, aten._unsafe_view):
        chain.append(at)
        at = at.args[0]
        if is_op(at, aten.clone):
            chain.append(at)
            at = at.args[0]
        if is_op(at, aten.expand) and is_op(at.args[0], aten.unsqueeze) and at.args[0].args[1] == 2:
            taken += [*chain, at, at.args[0]]
            return at.args[0].args[0]
    return node


def _cache_update(node: fx.Node) -> tuple[list[fx.Node], fx.Node, fx.Node, fx.Node] | None:
    """``[repeat_kv] <- [slice] <- index_copy|index_put``: (nodes, cache buffer, positions, new rows)."""
    taken: list[fx.Node] = []
    node = _strip_repeat_kv(node, taken)
    if is_op(node, aten.slice) and node.args[1] == 2 and (len(node.args) < 3 or node.args[2] == 0):
        taken.append(node)
        node = node.args[0]
    if is_op(node, aten.index_copy) and node.args[1] == 2:
        return [node, *taken], node.args[0], node.args[2], node.args[3]
    if is_op(node, aten.index_put):
        indices = node.args[1]
        if len(indices) == 3 and indices[0] is None and indices[1] is None and isinstance(indices[2], fx.Node):
            rows = node.args[2]
            # Indexing flattens the value it writes ([B, H, T, d] -> [B*H, T, d] when B is 1); undo that.
            if is_op(rows, aten.view, aten.reshape, aten._unsafe_view) and val(rows.args[0]).dim() == 4:
                rows = rows.args[0]
            return [node, *taken], node.args[0], indices[2], rows
    return None


def _written_back(node: fx.Node) -> bool:
    """A graph input the graph writes back (``copy_(input, ...)``): state such as a cache."""
    return node.op == "placeholder" and any(is_op(u, aten.copy_) and u.args[0] is node for u in node.users)


def _written_back_input(node: fx.Node, depth: int = 8) -> fx.Node | None:
    """The written-back input ``node`` was computed from through first arguments (views, copies, a
    cache update of some kind), if any."""
    for _ in range(depth):
        if not isinstance(node, fx.Node):
            return None
        if node.op == "placeholder":
            return node if _written_back(node) else None
        if node.op != "call_function" or not node.args:
            return None
        node = node.args[0]
    return None


def _match(node: fx.Node) -> Match | Miss | None:
    if not is_op(node, *SDPA_OPS):
        return None
    kwargs = sdpa_arguments(node)
    if kwargs is None:
        return None
    key, value = _cache_update(kwargs["key"]), _cache_update(kwargs["value"])
    if key is None and value is None:
        if _written_back_input(kwargs["key"]) is not None:
            return Miss(node, "the cache is updated another way than index_copy/index_put at the positions "
                              "(a sliding-window layer's roll + index_put): this layer stays dense")
        return None  # attention over plain tensors: not a cache
    if key is None or value is None:
        return Miss(node, "only one of key and value comes from a cache update")
    if key[2] is not value[2]:
        return Miss(node, "key and value caches are written at different positions")
    if val(key[3]).dim() != 4 or val(key[1]).dim() != 4:
        return Miss(node, "cache is not [batch, heads, length, head_dim]")
    if kwargs.get("dropout_p", 0.0) != 0.0:
        return Miss(node, "attention with dropout")
    root = sdpa_result(node)
    if not isinstance(root, fx.Node):
        return root
    mask = kwargs.get("attn_mask", kwargs.get("attn_bias"))
    return Match(root, [node, root], {
        "sdpa": node, "q": kwargs["query"], "k": key[3], "v": value[3], "positions": key[2], "mask": mask,
        "scale": kwargs.get("scale") or val(kwargs["query"]).shape[-1] ** -0.5,
        "updates": (key[0], value[0]), "buffers": (key[1], value[1]),
    })


def _replace(policy: Policy, layers: dict[fx.Node, int], gm: fx.GraphModule, m: Match) -> fx.Node:
    o = m.operands
    layer = layers[o["sdpa"]]
    key_buffer = o["buffers"][0]
    check_head_dim(policy, int(val(key_buffer).shape[3]), f"compress_kv_cache layer {layer}")
    site = graph_state.site(policy, layer, int(val(key_buffer).shape[2]), f"compress_kv_cache layer {layer}")
    # The sequence belongs to the key buffer the caller holds: the placeholder, or, for a buffer
    # the graph makes itself (and returns, for the next call to pass in), the updated buffer.
    owner = key_buffer if key_buffer.op == "placeholder" else o["updates"][0][0]
    with gm.graph.inserting_before(m.root):
        new = gm.graph.call_function(kv_attend, (o["q"], o["k"], o["v"], o["positions"], o["mask"], owner,
                                                 site.handle, float(o["scale"])))
    new.meta["val"] = val(m.root)
    for nodes, buffer in zip(o["updates"], o["buffers"]):
        _stop_writing(gm, nodes, buffer)
    return new


def _stop_writing(gm: fx.GraphModule, nodes: list[fx.Node], buffer: fx.Node) -> None:
    """A buffer the model passes in keeps its old contents: uses of the updated copy become uses
    of the buffer, and the write-back ``copy_(buffer, update)`` disappears. A buffer the graph
    makes itself (transformers allocates StaticCache lazily, inside the first compiled call) is
    still written once: returning the blank buffers instead would let cse merge them into one."""
    update = nodes[0]
    if buffer.op != "placeholder":
        return
    for user in list(update.users):
        if is_op(user, aten.copy_) and user.args[0] is buffer:
            user.replace_all_uses_with(buffer)
            gm.graph.erase_node(user)
    update.replace_all_uses_with(buffer)  # the views left reading it die with the attention


def compress_kv_cache(gm: fx.GraphModule, *, opts: Options) -> PassResult:
    if opts.kv is None:
        return PassResult(gm, False)
    # A layer is numbered by its attention's place among the graph's attentions, whether or not
    # its cache is compressed (DuoAttention's head patterns are per layer).
    layers = {n: i for i, n in enumerate(n for n in gm.graph.nodes if is_op(n, *SDPA_OPS))}
    rule = Rule(RULE, _match, partial(_replace, opts.kv, layers))
    writes_a_cache = any(_written_back(n) for n in gm.graph.nodes)
    keys = [arguments["key"] for arguments in map(sdpa_arguments, layers) if arguments is not None]
    attends_to_it = any(_written_back_input(k) is not None or _cache_update(k) is not None for k in keys)
    rewrites = apply_rules(gm, (rule,), "compress_kv_cache")
    if rewrites == 0 and writes_a_cache and not attends_to_it:
        # The graph writes a cache, yet no attention over it was found: say so, never compress silently nothing.
        counters["compress_kv_cache"][NOTHING_FOUND] += 1
        warnings.warn(f"fxpress: {NOTHING_FOUND}", UserWarning, stacklevel=2)
    return PassResult(gm, rewrites > 0)
