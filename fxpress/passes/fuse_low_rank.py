"""Pass fuse_low_rank: factored Linear chains become streaming ``fxpress::lowrank_*`` ops (FlashSVD).

A Linear compressed to two factors (``fxpress.compress.LowRankLinear``, or any model computing
``(x @ down.T) @ up.T + b``) captures as ``mm -> views -> addmm``. Run as written, it writes the
rank-r intermediate at full length, and the layers around it write their full-width outputs: the
FFN's D-wide activation, Q, K and V. Three rules, tried in this order, replace the chains::

    %p = mm(view(%x), t(%down)); %y = view(addmm(%b, view(%p), t(%up)))
        ->  %y = fxpress.lowrank_linear(%x, %down, %up, %b)
    low-rank -> gelu|gelu_tanh|silu|relu -> low-rank   (or SwiGLU: act(low-rank) * low-rank -> low-rank)
        ->  %y = fxpress.lowrank_ffn(%x, ...)
    low-rank Q, K, V -> split heads [-> RMSNorm, rotary on Q, K] [-> repeat_kv] -> sdpa [-> merge heads -> mm(t(%o_down))]
        ->  %o = fxpress.lowrank_attention(view(%pq), %q_up, ..., view(%pv), ..., %o_down, %cos, %sin)

Rotary models (Llama, Qwen2, SmolLM2; Cohere's interleaved pairs) rotate Q and K between their
projections and SDPA: ``q * cos + rotate_half(q) * sin``. The rule recognises both rotations, takes
the model's own cos and sin ([B|1, S, d]) into the op, which rotates each rebuilt head; GQA's
``repeat_kv`` copies and the empty-cache ``cat`` of a first forward are looked through, since the
op reads each KV head once for its whole group. Per-head RMSNorms of Q and K before the rotation
(Gemma 3's q_norm and k_norm after the transpose, Qwen 3's before it) join the op as well. The
patterns themselves are graph questions, in ``fxpress/ir/attention_inputs.py``.

When the attention result feeds a low-rank output projection, the projection's first factor joins
the attention op, which then returns the rank-r projection: the full-width attention output (a
[B, S, hidden] buffer) is never written, only [B, S, r_o].

A chain qualifies when its rank is small: ``r * (in + out) < in * out``, read from the metadata.
Refused candidates are counted with the reason (rank too large, an intermediate with other users,
an unknown activation, ...) and explain() lists them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

import fxpress.ops  # noqa: F401  (registers torch.ops.fxpress)
from fxpress.ir.options import Options
from fxpress.ir.match import (
    SDPA_OPS, Match, Miss, Rule, apply_rules, aten, insert_call, is_op, only_user, same_size, sdpa_arguments,
    sdpa_result, val)
from fxpress.ir.attention_inputs import HeadNorm, Rotary, head_norm, past_empty_cache, repeated_kv, rotary_at

_RESHAPES = (aten.view, aten._unsafe_view, aten.reshape)
_ACTIVATIONS = {aten.silu: "silu", aten.relu: "relu"}


@dataclass
class _Chain:
    """``(x @ down.T) @ up.T + bias``, found in the graph; ``root`` produces its [..., out] value."""

    x: fx.Node
    down: fx.Node
    up: fx.Node
    bias: fx.Node | None
    inner: fx.Node  # the mm producing the rank-r intermediate (2-D: [rows, r])
    root: fx.Node
    nodes: list[fx.Node] = field(default_factory=list)


def _transposed_weight(node: fx.Node) -> fx.Node | None:
    """``W`` of ``permute(W, [1, 0])`` or ``t(W)`` with W a contiguous 2-D tensor."""
    if is_op(node, aten.permute) and list(node.args[1]) in ([1, 0], [-1, 0], [1, -2]) or is_op(node, aten.t):
        weight = node.args[0]
        value = val(weight)
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.is_contiguous():
            return weight
    return None


def _through_reshapes(node: fx.Node, visited: list[fx.Node]) -> fx.Node:
    """Walk up single-user reshapes, recording them; return the first node that is not one."""
    while is_op(node, *_RESHAPES) and len(node.users) == 1:
        visited.append(node)
        node = node.args[0]
    return node


def _chain_at(outer: fx.Node) -> _Chain | Miss | None:
    """The factored Linear whose up-projection is the mm/addmm ``outer``."""
    if not is_op(outer, aten.mm, aten.addmm):
        return None
    bias = None
    if is_op(outer, aten.addmm):
        if outer.kwargs.get("beta", 1) != 1 or outer.kwargs.get("alpha", 1) != 1:
            return None
        bias, rank_input, outer_factor = outer.args[:3]
        if val(bias).dim() != 1:
            return None
    else:
        rank_input, outer_factor = outer.args[:2]
    nodes = [outer]
    inner = _through_reshapes(rank_input, nodes)
    if not is_op(inner, aten.mm, aten.addmm):
        return None
    n_in, rank = val(inner.args[-1]).shape
    n_out = val(outer_factor).shape[1]
    if rank >= min(n_in, n_out):
        return None  # two Linear layers in a row, not a factorisation
    if rank * (n_in + n_out) >= n_in * n_out:
        return Miss(outer, f"rank {rank} is not small for {n_in}->{n_out} (r*(in+out) >= in*out)")
    up, down = _transposed_weight(outer_factor), _transposed_weight(inner.args[-1])
    if is_op(inner, aten.addmm):
        return Miss(outer, "the inner (rank-r) projection has a bias")
    if up is None or down is None:
        return Miss(outer, "a factor is not a transposed contiguous 2-D weight")
    if len(inner.users) != 1:
        return Miss(outer, "the rank-r intermediate has other users")
    if len({val(n).dtype for n in (inner, outer, down, up) + ((bias,) if bias is not None else ())}) != 1:
        return Miss(outer, "factors and activations have mixed dtypes")
    nodes += [inner, outer_factor, inner.args[-1]]
    x = inner.args[0]
    # The Linear flattened x to 2-D and views the result back; fuse across both views.
    root = outer
    back = only_user(outer)
    if is_op(x, *_RESHAPES) and is_op(back, *_RESHAPES):
        source = x.args[0]
        expected = (*val(source).shape[:-1], n_out)
        if same_size(val(source).shape[-1:], [n_in]) and same_size(val(back).shape, expected):
            nodes += [x, back]
            x, root = source, back
    return _Chain(x, down, up, bias, inner, root, _in_graph_order(nodes))


def _chain_producing(node: fx.Node) -> _Chain | Miss | None:
    """The chain whose result is ``node`` itself."""
    outer = node.args[0] if is_op(node, *_RESHAPES) else node
    chain = _chain_at(outer) if isinstance(outer, fx.Node) else None
    if isinstance(chain, _Chain) and chain.root is not node:
        return None
    return chain


def _in_graph_order(nodes: list[fx.Node]) -> list[fx.Node]:
    unique = list(dict.fromkeys(nodes))
    order = {n: i for i, n in enumerate(unique[0].graph.nodes)} if unique else {}
    return sorted(unique, key=order.__getitem__)


# lowrank_linear ---------------------------------------------------------------------------------

def _match_linear(node: fx.Node) -> Match | Miss | None:
    chain = _chain_at(node)
    if not isinstance(chain, _Chain):
        return chain
    return Match(chain.root, chain.nodes, {"chain": chain})


def _replace_linear(gm: fx.GraphModule, m: Match) -> fx.Node:
    c = m.operands["chain"]
    return insert_call(gm, m.root, torch.ops.fxpress.lowrank_linear.default, (c.x, c.down, c.up, c.bias))


# lowrank_ffn ------------------------------------------------------------------------------------

def _activation_name(node: fx.Node) -> str | None:
    if is_op(node, aten.gelu):
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate)
    for op, name in _ACTIVATIONS.items():
        if is_op(node, op):
            return name
    return None


def _match_ffn(node: fx.Node) -> Match | Miss | None:
    second = _chain_at(node)
    if not isinstance(second, _Chain):
        return None  # the linear rule reports refused chains
    hidden = second.x
    if not isinstance(hidden, fx.Node) or hidden.op != "call_function" or len(hidden.users) != 1:
        return None
    gate = None
    if is_op(hidden, aten.mul):
        a, b = hidden.args[:2]
        for act, lin in ((a, b), (b, a)):
            if isinstance(act, fx.Node) and _activation_name(act) is not None and len(act.users) == 1:
                gate, first_value, activation = act.args[0], lin, _activation_name(act)
                extra = [act]
                break
        else:
            return None
    else:
        if not isinstance(hidden.args[0], fx.Node) or not isinstance(_chain_producing(hidden.args[0]), _Chain):
            return None
        activation = _activation_name(hidden)
        if activation is None:
            return Miss(hidden, f"unknown activation {hidden.target} between the low-rank projections")
        first_value, extra = hidden.args[0], []
    first = _chain_producing(first_value)
    gated = _chain_producing(gate) if gate is not None else None
    for part in (first, gated):
        if isinstance(part, Miss):
            return part
    if first is None or (gate is not None and gated is None):
        return None
    if len(first_value.users) != 1 or (gate is not None and len(gate.users) != 1):
        return Miss(hidden, "the D-wide activation has other users")
    if gated is not None and gated.x is not first.x:
        return Miss(hidden, "gate and up projections read different inputs")
    nodes = second.nodes + first.nodes + [hidden] + extra + (gated.nodes if gated else [])
    return Match(second.root, _in_graph_order(nodes),
                 {"first": first, "second": second, "gated": gated, "activation": activation})


def _replace_ffn(gm: fx.GraphModule, m: Match) -> fx.Node:
    f, s, g = m.operands["first"], m.operands["second"], m.operands["gated"]
    gate_args = (g.down, g.up, g.bias) if g is not None else (None, None, None)
    return insert_call(gm, m.root, torch.ops.fxpress.lowrank_ffn.default,
                       (f.x, f.down, f.up, f.bias, s.down, s.up, s.bias, m.operands["activation"], *gate_args))


# lowrank_attention ------------------------------------------------------------------------------

def _split_heads(node: fx.Node, users_within: set[fx.Node] = frozenset()
                 ) -> tuple[_Chain, int, HeadNorm | None] | Miss | None:
    """``permute(view(chain, [B, S, H, d]), [0, 2, 1, 3])``: the chain, its head count H, and the
    per-head RMSNorm when one sits between the view and the permute (Qwen 3). The permute may also
    feed ``users_within`` (a rotary embedding's or a norm's nodes)."""
    users = set(node.users)
    if not (is_op(node, aten.permute) and list(node.args[1]) == [0, 2, 1, 3]
            and (len(users) == 1 or users and users <= set(users_within))):
        return None
    split, norm = node.args[0], head_norm(node.args[0])
    if norm is not None and len(split.users) == 1:
        split = norm.x
    if not (is_op(split, *_RESHAPES) and val(split).dim() == 4
            and (len(split.users) == 1 or norm is not None and set(split.users) <= set(norm.nodes))):
        return None
    chain = _chain_producing(split.args[0])
    if not isinstance(chain, _Chain):
        return chain
    if val(chain.x).dim() != 3 or len(chain.root.users) != 1:
        return Miss(node, "projection is not [batch, seq, features] or has other users")
    chain.nodes += [split, node] + (norm.nodes if norm is not None else [])
    return chain, int(val(split).shape[2]), norm


def _head_source(node: fx.Node) -> tuple[fx.Node, Rotary | None, HeadNorm | None, list[fx.Node]]:
    """What feeds SDPA's query, key or value once the model's own steps between the split heads
    and SDPA are peeled off: GQA's repeat_kv, an empty cache's cat, the rotary embedding, a
    per-head RMSNorm (Gemma 3's q_norm and k_norm)."""
    peeled = []
    repeated = repeated_kv(node)
    if repeated is not None:
        node, nodes = repeated
        peeled += nodes
    uncached = past_empty_cache(node)
    if uncached is not None and len(node.users) == 1:
        peeled.append(node)
        node = uncached
    rotary = rotary_at(node)
    if rotary is not None:
        peeled += rotary.nodes
        node = rotary.x
    norm = head_norm(node)
    if norm is not None and (len(node.users) == 1 or set(node.users) <= set(peeled)):
        peeled += norm.nodes
        node = norm.x
    else:
        norm = None
    return node, rotary, norm, peeled


def _match_attention(node: fx.Node) -> Match | Miss | None:
    if not is_op(node, *SDPA_OPS):
        return None
    kwargs = sdpa_arguments(node)
    if kwargs is None:
        return Miss(node, "could not read the attention arguments")
    sources = {name: _head_source(kwargs[name]) for name in ("query", "key", "value")}
    found = {name: _split_heads(source, set(peeled)) for name, (source, _, _, peeled) in sources.items()}
    if all(f is None for f in found.values()) and not any(
            _low_rank_upstream(kwargs[name]) for name in ("query", "key", "value")):
        return None  # dense attention: not a candidate
    parts = []
    for name, f in found.items():
        if f is None:
            return Miss(node, f"{name} is not a low-rank projection split into heads (other ops in between?)")
        if isinstance(f, Miss):
            return f
        parts.append(f)
    if kwargs.get("dropout_p", 0.0) != 0.0:
        return Miss(node, "attention with dropout")
    rotary = _sharedrotary_at(node, *(sources[name][1] for name in ("query", "key", "value")))
    if isinstance(rotary, Miss):
        return rotary
    norms = _head_norms(node, *(sources[name][2] or parts[i][2] for i, name in enumerate(("query", "key", "value"))))
    if isinstance(norms, Miss):
        return norms
    mask = _boolean_mask(kwargs.get("attn_mask", kwargs.get("attn_bias")))
    if mask is not None and val(mask).dim() != 4:
        return Miss(node, f"attention mask of rank {val(mask).dim()}")
    root = sdpa_result(node)
    if not isinstance(root, fx.Node):
        return root
    (q, heads, _), (k, kv_heads, _), (v, v_heads, _) = parts
    if kv_heads != v_heads:
        return Miss(node, "key and value have different head counts")
    nodes = q.nodes + k.nodes + v.nodes + [n for *_, peeled in sources.values() for n in peeled] + [node, root]
    o_down = None
    output_projection = _output_down_projection(root)
    if output_projection is not None:
        o_down, taken = output_projection
        nodes += taken
        root = taken[-1]
    return Match(root, _in_graph_order(nodes), {
        "chains": (q, k, v), "heads": heads, "kv_heads": kv_heads, "mask": mask,
        "is_causal": bool(kwargs.get("is_causal", False)), "scale": kwargs.get("scale"), "o_down": o_down,
        "rotary": rotary, "norms": norms,
    })


def _head_norms(node: fx.Node, query: HeadNorm | None, key: HeadNorm | None,
                value: HeadNorm | None) -> tuple[fx.Node, fx.Node, float] | Miss | None:
    """(q weight, k weight, eps) of the per-head RMSNorms of queries and keys, or None."""
    if query is None and key is None and value is None:
        return None
    if query is None or key is None or value is not None:
        return Miss(node, "a per-head RMSNorm on some of query, key and value but not on exactly the first two")
    if query.eps != key.eps:
        return Miss(node, f"query and key norms with different eps ({query.eps}, {key.eps})")
    return query.weight, key.weight, query.eps


def _sharedrotary_at(node: fx.Node, query: Rotary | None, key: Rotary | None,
                   value: Rotary | None) -> Rotary | Miss | None:
    """The one rotary embedding of queries and keys (None when neither is rotated)."""
    if query is None and key is None and value is None:
        return None
    if query is None or key is None or value is not None:
        return Miss(node, "a rotary embedding on some of query, key and value but not on exactly the first two")
    if (query.cos, query.sin, query.interleaved) != (key.cos, key.sin, key.interleaved):
        return Miss(node, "queries and keys rotated by different tables")
    q_shape, k_shape, table = val(query.x).shape, val(key.x).shape, val(query.cos).shape
    if not (same_size(q_shape[2:], table[1:]) and same_size(k_shape[2:], table[1:])
            and same_size(val(query.sin).shape, table) and val(query.cos).dtype == val(query.x).dtype):
        return Miss(node, f"rotary tables {tuple(table)} that are not [batch|1, seq, head_dim] of the "
                          f"queries {tuple(q_shape)} and keys {tuple(k_shape)}")
    return query


def _low_rank_upstream(node: fx.Node, depth: int = 10) -> bool:
    """A low-rank chain feeds ``node`` within ``depth`` ops (say, through a rotary embedding)."""
    frontier, seen = [node], set()
    for _ in range(depth):
        frontier = [i for n in frontier for i in n.all_input_nodes if i not in seen and i.op == "call_function"]
        seen.update(frontier)
        if any(isinstance(_chain_at(n), _Chain) for n in frontier):
            return True
    return False


def _boolean_mask(mask: fx.Node | None) -> fx.Node | None:
    """``c`` for an additive mask built as ``where(c, 0, -inf)``: SDPA turns a boolean mask into
    exactly that additive one, and the boolean is a quarter of the bytes (fp32) to keep alive."""
    if not is_op(mask, aten.where) or val(mask.args[0]).dtype != torch.bool:
        return mask
    keep, drop = _scalar_value(mask.args[1]), _scalar_value(mask.args[2])
    return mask.args[0] if keep == 0 and drop == float("-inf") else mask


def _scalar_value(arg: object) -> object:
    """The number a ``scalar_tensor`` node (or a literal) stands for; None otherwise."""
    if is_op(arg, aten.scalar_tensor):
        return arg.args[0]
    return arg if isinstance(arg, (int, float)) else None


def _output_down_projection(result: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """When the attention result only feeds a low-rank output projection (heads merged back,
    flattened, ``mm`` by the first factor): that factor, and the nodes up to that ``mm``."""
    taken = []
    permute = only_user(result)
    while is_op(permute, *_RESHAPES) and same_size(val(permute).shape, val(result).shape):
        taken.append(permute)  # a view that changes nothing
        permute = only_user(permute)
    if not (is_op(permute, aten.permute) and list(permute.args[1]) == [0, 2, 1, 3]):
        return None
    taken.append(permute)
    node = only_user(permute)
    while is_op(node, *_RESHAPES):
        taken.append(node)
        node = only_user(node)
    if not (is_op(node, aten.mm) and node.args[0] is taken[-1] and val(taken[-1]).dim() == 2):
        return None
    outer = only_user(node)
    while is_op(outer, *_RESHAPES):
        outer = only_user(outer)
    chain = _chain_at(outer) if outer is not None else None
    if not (isinstance(chain, _Chain) and chain.inner is node):
        return None
    return chain.down, taken + [node.args[1], node]


def _replace_attention(gm: fx.GraphModule, m: Match) -> fx.Node:
    ops = m.operands
    factors = []
    for chain in ops["chains"]:
        batch_seq = tuple(val(chain.x).shape[:2])
        p = insert_call(gm, m.root, aten.view.default, (chain.inner, [*batch_seq, val(chain.inner).shape[1]]))
        factors += [p, chain.up, chain.bias]
    rotary = ops["rotary"]
    rotation = (None, None, False) if rotary is None else (rotary.cos, rotary.sin, rotary.interleaved)
    norms = ops["norms"] or (None, None, 1e-6)
    attention = insert_call(gm, m.root, torch.ops.fxpress.lowrank_attention.default,
                            (*factors, ops["heads"], ops["kv_heads"], ops["mask"], ops["is_causal"],
                             ops["scale"], ops["o_down"], *rotation, *norms))
    if ops["o_down"] is None:
        return attention
    # The op returned [B, S, rank_o]; the output projection's second factor reads it flattened.
    return insert_call(gm, m.root, aten.view.default, (attention, list(val(m.root).shape)))


def _match_rotary_attention(node: fx.Node) -> Match | None:
    """The attention rule's matches whose queries and keys are rotated (its misses stay its own)."""
    found = _match_attention(node)
    return found if isinstance(found, Match) and found.operands["rotary"] is not None else None


RULES = (
    Rule("low-rank -> activation -> low-rank => lowrank_ffn", _match_ffn, _replace_ffn),
    Rule("low-rank Q, K (rotary), V -> sdpa [-> low-rank O] => lowrank_attention", _match_rotary_attention,
         _replace_attention),
    Rule("low-rank Q, K, V -> sdpa [-> low-rank O] => lowrank_attention", _match_attention, _replace_attention),
    Rule("x @ down.T @ up.T (+ b) => lowrank_linear", _match_linear, _replace_linear),
)


def fuse_low_rank(gm: fx.GraphModule, *, opts: Options) -> PassResult:
    modified = apply_rules(gm, RULES, "fuse_low_rank") > 0
    if modified:  # additive masks whose boolean the attention ops took instead
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return PassResult(gm, modified)
