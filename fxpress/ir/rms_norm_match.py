"""The RMSNorm chain as models write it, found around its ``rsqrt``: what ``fuse_rms_norm`` fuses
and what ``fuse_low_rank`` reads as a per-head norm of queries and keys.

    %p = pow(%x, 2); %m = mean(%p, [-1], True); %a = add(%m, eps); %r = rsqrt(%a)
    %n = mul(%x, %r) [; %y = mul(%w, %n)]

with or without the fp32 up-cast of ``x`` (and the cast back), with or without a weight (any 1-D
tensor of the last dim's size: Gemma's ``1 + w`` counts).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxpress.ir.match import Match, Miss, aten, is_last_dim, is_op, only_user, same_size, val


def _squared(node: fx.Node) -> fx.Node | None:
    """The ``x`` of ``x ** 2`` written as pow or as x * x."""
    if is_op(node, aten.pow) and node.args[1] == 2:
        return node.args[0]
    if is_op(node, aten.mul) and node.args[0] is node.args[1]:
        return node.args[0]
    return None


def _other_operand(mul: fx.Node, known: fx.Node) -> fx.Node | None:
    a, b = mul.args[:2]
    return b if a is known else a if b is known else None


def _is_cast(node: fx.Node, dtype: torch.dtype) -> bool:
    return is_op(node, aten._to_copy) and set(node.kwargs) == {"dtype"} and node.kwargs["dtype"] == dtype


def rms_norm_at(rsqrt: fx.Node) -> Match | Miss | None:
    """The RMSNorm chain around ``rsqrt``: operands ``x``, ``weight`` (or None) and ``eps``; its
    root is the normalised (and weighted) value. fuse_low_rank reads per-head norms with it."""
    if not is_op(rsqrt, aten.rsqrt):
        return None
    add = rsqrt.args[0]
    if not (is_op(add, aten.add) and isinstance(add.args[1], float)):
        return Miss(rsqrt, "rsqrt input is not mean(x**2) + eps")
    mean = add.args[0]
    if not (is_op(mean, aten.mean) and len(mean.args) >= 3 and mean.args[2] is True):
        return Miss(rsqrt, "no keepdim mean before + eps")
    x32 = _squared(mean.args[0])
    if x32 is None or not is_last_dim(mean.args[1], val(x32).dim()):
        return Miss(rsqrt, "mean is not of x**2 over the last dimension")
    scale = only_user(rsqrt)
    if scale is None or not is_op(scale, aten.mul) or _other_operand(scale, rsqrt) is not x32:
        return Miss(rsqrt, "rsqrt does not scale the same x it was computed from")
    if val(x32).dtype != torch.float32:
        return Miss(rsqrt, f"statistics computed in {val(x32).dtype}, not float32")
    chain = [mean.args[0], mean, add, rsqrt, scale]
    if any(len(n.users) != 1 for n in chain[:-1]):
        return Miss(rsqrt, "an intermediate of the chain has other users")

    # The input: x itself, or x up-cast to fp32 and the result cast back to x's dtype.
    x, out = x32, scale
    if _is_cast(x32, torch.float32) and len(x32.users) == 2:
        back = only_user(scale)
        if back is None or not _is_cast(back, val(x32.args[0]).dtype):
            return Miss(rsqrt, "fp32 up-cast without the cast back to the input dtype")
        x, out = x32.args[0], back
        chain = [x32, *chain, back]

    weight = None
    scaled = only_user(out)
    if scaled is not None and is_op(scaled, aten.mul):
        w = _other_operand(scaled, out)
        w_val = val(w)
        if isinstance(w_val, torch.Tensor) and w_val.dim() == 1 and same_size(
            w_val.shape[-1:], val(x).shape[-1:]
        ):
            weight, out = w, scaled
            chain.append(scaled)
    return Match(root=out, nodes=chain, operands={"x": x, "weight": weight, "eps": add.args[1]})
