"""Pass lut_matmul: dequantise-then-matmul of bit-plane weights becomes ``fxpress::lut_linear``.

A ``fxpress.compress.QuantizedLinear`` captures as::

    %w = fxpress.dequantize_planes(%planes, %alpha, %beta, K, g); %y = mm(%x, t(%w))   (or addmm(%b, ...))
        ->  %y = fxpress.lut_linear(%x, %planes, %alpha, %beta, %b, K, g, max_lut_rows)

A weight dequantised in the graph from constant integer codes, ``(w_q - zero) * scale`` reshaped
to ``[out, in]`` (per-group ``zero`` and ``scale`` of shape ``[out, groups, 1]``), is repacked into
bit-planes at compile time and becomes the same op.

The float weight is never made. ``lut_linear`` picks its algorithm by the number of rows of ``%x``:
LUT-GEMM's table lookup up to ``opts.lut_max_rows`` (decode), dequantise-per-tile GEMM above it
(prefill). Unset, the threshold follows the measurements of the weight's device: on CPU the table
wins at 1 row and loses at 16 (``bench/lut.py``), so 4; on an H100 the Triton tiled GEMM beat the
Triton LUT kernel already at 1 row (``bench/lut_gpu.py``), so 0.
With a static row count the choice is made here and counted (explain() lists it); with a symbolic
one the op chooses at each call.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

import fxpress.ops  # noqa: F401  (registers torch.ops.fxpress)
from fxpress.core.counters import counters
import fxpress.lowbit as lowbit
from fxpress.ir.match import Match, Miss, Rule, add_constant, apply_rules, aten, insert_call, is_op, val

GROUP = "lut_matmul"
# Codes a graph dequantises itself are repacked up to 4 bits; wider ones (int8 weight-only) are
# left to the dense matmul the user chose. Imported 5/6/8-bit weights arrive as bit-planes already.
REPACKED_BITS = (2, 3, 4)


def _dequantized_weight(node: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """The ``dequantize_planes`` node behind ``t(w)`` / ``permute(w, [1, 0])``, through a dtype cast."""
    if not (is_op(node, aten.t) or is_op(node, aten.permute) and list(node.args[1]) in ([1, 0], [-1, 0])):
        return None
    chain = [node]
    source = node.args[0]
    if is_op(source, aten._to_copy):
        chain.append(source)
        source = source.args[0]
    if is_op(source, torch.ops.fxpress.dequantize_planes):
        return source, chain + [source]
    return None


def _constant(gm_node: fx.Node) -> torch.Tensor | None:
    if gm_node.op != "get_attr":
        return None
    return getattr(gm_node.graph.owning_module, gm_node.target)


def _uniform_codes(node: fx.Node) -> dict | Miss | None:
    """``view(mul(sub(_to_copy(w_q), zero), scale))`` with constant integer codes: the codes, zero,
    scale, bits and the nodes of the chain; None when ``node`` is not such a chain."""
    chain = []
    while is_op(node, aten.view, aten._unsafe_view, aten.reshape):
        chain.append(node)
        node = node.args[0]
    if not is_op(node, aten.mul) or not all(isinstance(a, fx.Node) for a in node.args):
        return None
    sub, scale = node.args if is_op(node.args[0], aten.sub) else node.args[::-1]
    if not is_op(sub, aten.sub) or not is_op(sub.args[0], aten._to_copy) or not isinstance(sub.args[1], fx.Node):
        return None
    codes, zero, scale_t = (_constant(n) for n in (sub.args[0].args[0], sub.args[1], scale))
    if codes is None or zero is None or scale_t is None:
        return None
    if codes.is_floating_point() or codes.dim() != 3 or tuple(zero.shape) != (*codes.shape[:2], 1) or \
            tuple(scale_t.shape) != tuple(zero.shape):
        return Miss(node, f"codes {tuple(codes.shape)} with zero {tuple(zero.shape)} are not [out, groups, group] "
                          "integers with one zero and scale per group")
    top = int(codes.max()) if codes.numel() else 0
    bits = next((b for b in REPACKED_BITS if top < 2 ** b), None)
    if bits is None or int(codes.min()) < 0 or codes.shape[2] % 32:
        return Miss(node, f"codes span 0..{top} in groups of {codes.shape[2]}: not 2-4 bits in groups of 32k")
    nodes = [sub.args[0], sub, node, *reversed(chain)]
    return {"codes": codes, "zero": zero.squeeze(-1), "scale": scale_t.squeeze(-1), "bits": bits, "nodes": nodes}


def _match(node: fx.Node) -> Match | Miss | None:
    if not is_op(node, aten.mm, aten.addmm):
        return None
    bias, x, weight_t = (None, *node.args[:2]) if is_op(node, aten.mm) else node.args[:3]
    found = _dequantized_weight(weight_t)
    if found is None:
        if not (is_op(weight_t, aten.t) or is_op(weight_t, aten.permute) and list(weight_t.args[1]) in ([1, 0], [-1, 0])):
            return None
        uniform = _uniform_codes(weight_t.args[0])
        if uniform is None or isinstance(uniform, Miss):
            return uniform
        return Match(root=node, nodes=[*uniform["nodes"], weight_t, node],
                     operands={"x": x, "bias": bias, "uniform": uniform})
    dequantize, chain = found
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        return Miss(node, "addmm with beta or alpha")
    if bias is not None and val(bias).dim() != 1:
        return Miss(node, "bias is not one row")
    return Match(root=node, nodes=[*reversed(chain), node], operands={"x": x, "bias": bias, "dequantize": dequantize})


DEFAULT_MAX_ROWS = {"cpu": 4}  # any other device: 0


def _replace(gm: fx.GraphModule, m: Match, max_rows: int | None) -> fx.Node:
    if "uniform" in m.operands:  # repack the constant codes once, here
        u = m.operands["uniform"]
        packed = lowbit.from_codes(u["codes"].cpu(), u["zero"].cpu(), u["scale"].cpu(), u["bits"])
        device = u["codes"].device
        planes, alpha, beta = (add_constant(gm, m.root, f"lut_{part}_{m.root.name}", getattr(packed, part).to(device))
                               for part in ("planes", "alpha", "beta"))
        in_features, group_size = packed.in_features, packed.group_size
        counters[GROUP]["(w_q - zero) * scale repacked into bit-planes"] += 1
    else:
        # An imported weight's exact offset stays with dequantize_planes: beta carries it to rounding.
        planes, alpha, beta, in_features, group_size = m.operands["dequantize"].args[:5]
    if max_rows is None:
        max_rows = DEFAULT_MAX_ROWS.get(val(m.operands["x"]).device.type, 0)
    rows = val(m.operands["x"]).shape[0]
    if isinstance(rows, torch.SymInt):
        counters[GROUP]["rows symbolic: lut_linear chooses per call"] += 1
    else:
        path = "LUT" if rows <= max_rows else "dequantise per tile + mm"
        counters[GROUP][f"{rows} rows (lut_max_rows={max_rows}): {path}"] += 1
    return insert_call(gm, m.root, torch.ops.fxpress.lut_linear.default,
                       (m.operands["x"], planes, alpha, beta, m.operands["bias"], in_features, group_size, max_rows))


def lut_matmul(gm: fx.GraphModule, *, opts) -> PassResult:
    rule = Rule("mm(x, t(dequantized weight)) => lut_linear", _match, lambda g, m: _replace(g, m, opts.lut_max_rows))
    # Matching reads constant codes and repacks them: real tensors, though a compile may run inside
    # the tracer's fake mode.
    with torch._subclasses.fake_tensor.unset_fake_temporarily():
        return PassResult(gm, apply_rules(gm, (rule,), GROUP) > 0)
