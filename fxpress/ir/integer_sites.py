"""Which nodes of an ATen graph the integer-only pass rewrites, and the stable name of each.

A site is named by the module that called the op and the op's kind, e.g.
``encoder.layer.0.attention.self:softmax`` (``#1``, ``#2`` for further calls in the same module).
The name comes from the node's ``nn_module_stack``, so calibration and compilation, which capture
the model separately, agree on it, and explain() can print it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.fx as fx

from fxpress.ir.match import SDPA_OPS, aten, is_op, val


@dataclass(frozen=True)
class Site:
    node: fx.Node
    kind: str  # "softmax", "gelu", "layer_norm", "linear" or "sdpa" (an attention whose softmax is rewritten)
    key: str

    @property
    def input(self) -> fx.Node:
        """The float tensor the site quantises (for an SDPA, its query: the scores are computed)."""
        return linear_parts(self.node)[0] if self.kind == "linear" else self.node.args[0]


def linear_parts(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None] | None:
    """``(x, weight, bias)`` of ``mm(x, permute(weight))`` / ``addmm(bias, x, permute(weight))``
    with ``weight`` a frozen ``[out, in]`` constant: a linear layer as capture leaves it."""
    if not is_op(node, aten.mm, aten.addmm) or node.kwargs:  # kwargs: addmm's beta or alpha
        return None
    bias, x, transposed = (None, *node.args) if is_op(node, aten.mm) else node.args
    if not (is_op(transposed, aten.permute) and list(transposed.args[1]) in ([1, 0], [-1, 0])
            or is_op(transposed, aten.t)):
        return None
    weight = transposed.args[0]
    if weight.op != "get_attr" or (bias is not None and (not isinstance(bias, fx.Node) or bias.op != "get_attr")):
        return None
    return x, weight, bias


def module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = re.sub(r"\._modules\[['\"]([^'\"]+)['\"]\]", r".\1", path)
    path = re.sub(r"^L\[['\"]self['\"]\]\.?", "", path)
    return path


def site_kind(node: fx.Node, sdpa: bool) -> str | None:
    """The kind of site ``node`` is, or None. Only float ops over the last dimension qualify."""
    if node.op != "call_function":
        return None
    x = val(node.args[0]) if node.args else None
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return None
    if is_op(node, aten._softmax) and node.args[1] in (-1, x.dim() - 1):
        return "softmax"
    if is_op(node, aten.gelu):
        return "gelu"
    if is_op(node, aten.native_layer_norm) and len(node.args[1]) == 1:
        return "layer_norm"
    linear = linear_parts(node)
    if linear is not None and val(linear[0]).is_floating_point():
        return "linear"
    if sdpa and is_op(node, *SDPA_OPS):
        return "sdpa"
    return None


def find_sites(gm: fx.GraphModule, sdpa: bool = False) -> list[Site]:
    seen: dict[str, int] = {}
    sites = []
    for node in gm.graph.nodes:
        kind = site_kind(node, sdpa)
        if kind is None:
            continue
        # An attention's softmax, decomposed or not, is calibrated under the same name.
        base = f"{module_path(node)}:{'softmax' if kind == 'sdpa' else kind}"
        n = seen[base] = seen.get(base, -1) + 1
        sites.append(Site(node, kind, base if n == 0 else f"{base}#{n}"))
    return sites
