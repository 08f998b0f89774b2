"""What models put between a projection split into heads and SDPA, as graph patterns:
``fuse_low_rank`` looks through these to reach the low-rank projections and hands what they mean
(the rotary tables, the norm weights) to ``fxpress::lowrank_attention``.

- ``rotary_at``: ``x * cos + rotate(x) * sin``, ``rotate`` being Llama's ``rotate_half`` (halves of
  the head: ``cat(-x2, x1)``) or the interleaved pairs of GPT-J and Cohere
  (``stack(-x_odd, x_even).flatten``), with ``cos`` and ``sin`` the model's ``[B|1, S, d]`` tables
  unsqueezed over the heads;
- ``head_norm``: a weighted RMSNorm over each head's channels (Gemma 3's and Qwen 3's q/k norms);
- ``repeated_kv``: transformers' ``repeat_kv`` copies of the KV heads for an SDPA without GQA;
- ``past_empty_cache``: ``cat([empty, k])``, a first forward appending to an empty cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.fx as fx

from fxpress.ir.match import Match, aten, is_op, same_size, val
from fxpress.ir.rms_norm_match import rms_norm_at

_RESHAPES = (aten.view, aten._unsafe_view, aten.reshape)


@dataclass
class HeadNorm:
    """``x * rsqrt(mean(x**2, -1) + eps) * weight`` over each head's channels (q_norm, k_norm)."""

    x: fx.Node
    weight: fx.Node
    eps: float
    nodes: list[fx.Node]


def head_norm(node: Any) -> HeadNorm | None:
    """The weighted RMSNorm whose result is ``node`` (Gemma's ``1 + w`` counts as the weight)."""
    if not is_op(node, aten.mul):
        return None
    for scaled in node.args:
        rsqrt = next((a for a in getattr(scaled, "args", ()) if is_op(a, aten.rsqrt)), None)
        found = rms_norm_at(rsqrt) if is_op(scaled, aten.mul) and rsqrt is not None else None
        if isinstance(found, Match) and found.root is node and found.operands["weight"] is not None:
            return HeadNorm(found.operands["x"], found.operands["weight"], found.operands["eps"], found.nodes)
    return None


@dataclass
class Rotary:
    """``x * cos + rotate(x) * sin`` (``rotate``: rotate_half, or the interleaved pairs)."""

    x: fx.Node
    cos: fx.Node  # [B|1, S, d], as the model computed it (before its unsqueeze over heads)
    sin: fx.Node
    interleaved: bool
    nodes: list[fx.Node]


def _last_dim_slice(node: Any, x: fx.Node, start: int, step: int, stop: int | None = None) -> bool:
    """``node`` is ``x[..., start:stop:step]`` (stop None: to the end)."""
    if not (is_op(node, aten.slice) and node.args[0] is x and len(node.users) == 1):
        return False
    dim, first, last, stride = (list(node.args[1:]) + [0, None, None, 1][len(node.args) - 1:])[:4]
    width = val(x).shape[-1]
    reaches_end = last is None or (isinstance(last, int) and last >= width)
    return (dim in (-1, val(x).dim() - 1) and first == start and stride == step
            and (reaches_end if stop is None else last == stop))


def _rotation_of(turned: Any, x: fx.Node) -> tuple[bool, list[fx.Node]] | None:
    """Whether ``turned`` is Llama's ``rotate_half(x)`` (False) or the interleaved pairs (True),
    with the nodes computing it; None when it is neither."""
    width = val(x).shape[-1]
    if not isinstance(width, int) or width % 2:
        return None
    half = width // 2
    last = (-1, val(x).dim() - 1)
    if is_op(turned, aten.cat) and len(turned.args[0]) == 2 and turned.args[1] in last:
        negated, first = turned.args[0]
        if (is_op(negated, aten.neg) and len(negated.users) == 1 and _last_dim_slice(negated.args[0], x, half, 1)
                and _last_dim_slice(first, x, 0, 1, half)):
            return False, [turned, negated, negated.args[0], first]
    if not (is_op(turned, *_RESHAPES) and same_size(val(turned).shape, val(x).shape)):
        return None
    pairs = turned.args[0]
    if not (is_op(pairs, aten.cat) and len(pairs.args[0]) == 2 and len(pairs.users) == 1
            and pairs.args[1] in (-1, val(x).dim())):
        return None
    negated, first = [u.args[0] if is_op(u, aten.unsqueeze) and u.args[1] in (-1, val(x).dim()) else None
                      for u in pairs.args[0]]
    if (is_op(negated, aten.neg) and len(negated.users) == 1 and _last_dim_slice(negated.args[0], x, 1, 2)
            and _last_dim_slice(first, x, 0, 2)):
        return True, [turned, pairs, *pairs.args[0], negated, negated.args[0], first]
    return None


def _position_table(factor: Any) -> fx.Node | None:
    """``c`` of ``unsqueeze(c, 1)``: the [B|1, S, d] cos or sin broadcast over the heads."""
    if is_op(factor, aten.unsqueeze) and factor.args[1] == 1 and val(factor.args[0]).dim() == 3:
        return factor.args[0]
    return None


def rotary_at(node: fx.Node) -> Rotary | None:
    """The rotary embedding computed at ``node``, whichever way round its sums and products are."""
    if not (is_op(node, aten.add) and len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1):
        return None
    for plain, rotated in (node.args, node.args[::-1]):
        if not (is_op(plain, aten.mul) and is_op(rotated, aten.mul)
                and len(plain.users) == 1 and len(rotated.users) == 1):
            continue
        for x, cos in (plain.args, plain.args[::-1]):
            for turned, sin in (rotated.args, rotated.args[::-1]):
                form = _rotation_of(turned, x) if isinstance(x, fx.Node) else None
                tables = _position_table(cos), _position_table(sin)
                if form is not None and None not in tables:
                    return Rotary(x, *tables, form[0], [node, plain, rotated, *form[1]])
    return None


def repeated_kv(node: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """``x`` of transformers' ``repeat_kv(x)`` (GQA heads copied for an SDPA without enable_gqa):
    ``view(clone(expand(unsqueeze(x, 2))), [B, kv * n, S, d])``, and its nodes."""
    if not (is_op(node, *_RESHAPES) and val(node).dim() == 4):
        return None
    nodes, inner = [node], node.args[0]
    if is_op(inner, aten.clone) and len(inner.users) == 1:
        nodes.append(inner)
        inner = inner.args[0]
    if not (is_op(inner, aten.expand) and len(inner.users) == 1):
        return None
    unsqueezed = inner.args[0]
    if not (is_op(unsqueezed, aten.unsqueeze) and unsqueezed.args[1] == 2 and len(unsqueezed.users) == 1):
        return None
    return unsqueezed.args[0], nodes + [inner, unsqueezed]


def past_empty_cache(node: fx.Node) -> fx.Node | None:
    """``x`` of ``cat([empty, x], dim)``: a first forward appending its keys to an empty cache."""
    if not (is_op(node, aten.cat) and len(node.args[0]) == 2):
        return None
    empty, x = node.args[0]
    return x if isinstance(empty, fx.Node) and val(empty).numel() == 0 and val(empty).dim() == 1 else None
