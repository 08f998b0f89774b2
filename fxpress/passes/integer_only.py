"""Pass ``integer_only``: softmax, GELU and LayerNorm become integer-only ops (I-BERT / I-ViT).

Runs only when asked (``fxpress.backend(integer=fxpress.IntegerOnly(...))``): integer arithmetic
changes the numbers, and explain() reports by how much at each site. Each float input is
quantised to int8, at its calibrated per-tensor scale or at a per-row scale computed at run time,
and the op runs on integers::

    softmax(x)    => int_softmax(int_quantize(x, s), s)  * 2**-bits   (int_softmax_dynamic(x): s per row)
    gelu(x)       => int_gelu(int_quantize(x, s), s)     * int_gelu_scale(s)
    layer_norm(x) => int_layer_norm(int_quantize(x, s))  * (weight-folded scale per channel)
    linear(x)     => int_matmul(int_quantize(x, s), w_codes.T) * s * w_scale + bias   (asked for)

The trailing multiply is the dequantisation, written as plain ATen ops (a pointwise kernel) so it
exists only where a float op reads the result: a LayerNorm fed by a rewritten GELU takes the GELU's
int32 codes directly. With ``sdpa=True`` a ``scaled_dot_product_attention`` is first decomposed
into ``matmul -> scale (+ mask) -> softmax -> matmul`` so its softmax can be rewritten too.
"""

from __future__ import annotations

import functools
import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassResult

from fxpress.core.counters import counters
from fxpress.integer import constants, matmul
from fxpress.core.errors import IntegerError
from fxpress.integer.config import IntegerOnly
from fxpress.integer.measure import site_tag
from fxpress.ir.integer_sites import Site, find_sites, linear_parts
from fxpress.ir.match import add_constant, aten, insert_call, sdpa_arguments, sdpa_result, val

ops = torch.ops.fxpress
GROUP = "integer_only"


class _Rewriter:
    def __init__(self, gm: fx.GraphModule, cfg: IntegerOnly) -> None:
        self.gm, self.cfg = gm, cfg
        # dequantised GELU -> (its int32 codes, their bits, their scale)
        self.codes_of: dict[fx.Node, tuple[fx.Node, int, fx.Node]] = {}
        self.scale_of: dict[fx.Node, tuple] = {}  # GELU codes -> (input scale node, its output scale fn)

    def call(self, before: fx.Node, target, *args) -> fx.Node:
        return insert_call(self.gm, before, target, args)

    def scale(self, site: Site, x: fx.Node, masked: bool, bits: int = 8, before: fx.Node | None = None) -> fx.Node:
        before = before or site.node
        calibrated = self.cfg.calibration.scale(site.key, bits) if self.cfg.calibration is not None else None
        if calibrated is None:
            if self.cfg.calibration is not None:
                counters[GROUP][f"{site.kind} [uncalibrated: per-row scales]"] += 1
            return self.call(before, ops.int_row_scale.default, x, masked, bits)
        device = val(x).device
        return add_constant(self.gm, before, f"int_scale_{before.name}",
                            torch.tensor([calibrated], dtype=torch.float32, device=device))

    def dequantize(self, before: fx.Node, codes: fx.Node, scale: fx.Node | float, dtype: torch.dtype) -> fx.Node:
        """``codes * scale`` in fp32 (the scales are fp32), then in the replaced op's dtype."""
        as_float = insert_call(self.gm, before, aten._to_copy.default, (codes,), {"dtype": torch.float32})
        result = self.call(before, aten.mul.Tensor, as_float, scale)
        if dtype != torch.float32:
            result = insert_call(self.gm, before, aten._to_copy.default, (result,), {"dtype": dtype})
        return result

    def softmax(self, site: Site, node: fx.Node) -> fx.Node:
        x, dtype, cfg = node.args[0], val(node).dtype, self.cfg
        s = self.scale(site, x, masked=True, before=node)
        constants_ = (cfg.method, cfg.clip("softmax"), cfg.softmax_exp_bits, cfg.softmax_bits)
        if s.target is ops.int_row_scale.default:
            # Nothing downstream reads a per-row scale of the softmax's input (its output's scale is
            # fixed): row scale, quantise and softmax run as one kernel.
            self.gm.graph.erase_node(s)
            p = self.call(node, ops.int_softmax_dynamic.default, x, *constants_)
        else:
            q = self.call(node, ops.int_quantize.default, x, s, True, 8)
            p = self.call(node, ops.int_softmax.default, q, s, *constants_)
        result = self.dequantize(node, p, 2.0 ** -cfg.softmax_bits, dtype)
        result.meta["integer_site"] = site_tag(site.key, "softmax", cfg.method, x, functools.partial(torch.softmax, dim=-1))
        return result

    def gelu(self, site: Site) -> fx.Node:
        node, cfg = site.node, self.cfg
        x = node.args[0]
        s = self.scale(site, x, masked=False)
        q = self.call(node, ops.int_quantize.default, x, s, False, 8)
        codes = self.call(node, ops.int_gelu.default, q, s, cfg.method, cfg.clip("gelu"), cfg.gelu_exp_bits)
        if s.op == "get_attr":  # a calibrated scale: the output scale is a constant too
            out_scale = add_constant(self.gm, node, f"int_gelu_scale_{node.name}",
                                     constants.gelu_output_scale(getattr(self.gm, s.target), cfg.method))
        else:
            out_scale = self.call(node, ops.int_gelu_scale.default, s, cfg.method)
        result = self.dequantize(node, codes, out_scale, val(node).dtype)
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        result.meta["integer_site"] = site_tag(site.key, "gelu", cfg.method, x,
                                               functools.partial(F.gelu, approximate=approximate))
        self.codes_of[result] = (codes, constants.GELU_OUTPUT_BITS[cfg.method], out_scale)
        self.scale_of[codes] = (s, functools.partial(constants.gelu_output_scale, method=cfg.method))
        return result

    def layer_norm(self, site: Site) -> fx.Node | str:
        node = site.node
        x, shape, weight, bias = node.args[:4]
        if any(u.target is not operator.getitem or u.args[1] != 0 for u in node.users):
            return "its mean or rstd is read"
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.op != "get_attr":
                return f"its {name} is not a frozen constant"
        width = int(shape[0])
        try:
            out_shift, bias_codes, out_scale = constants.layer_norm_affine(
                getattr(self.gm, weight.target) if weight is not None else None,
                getattr(self.gm, bias.target) if bias is not None else None, width)
            chained = self.codes_of.get(x)
            in_bits = chained[1] if chained else self.cfg.layer_norm_input_bits - 1
            in_shift, var_shift = constants.layer_norm_shifts(width, in_bits)
        except IntegerError as e:
            return str(e)
        if chained:
            q = chained[0]
            counters[GROUP]["gelu -> layer_norm kept in int32"] += 1
        else:
            bits = self.cfg.layer_norm_input_bits
            q = self.call(node, ops.int_quantize.default, x, self.scale(site, x, False, bits), False, bits)
        device = val(x).device
        bias_node = add_constant(self.gm, node, f"int_ln_bias_{node.name}", bias_codes.to(device))
        codes = self.call(node, ops.int_layer_norm.default, q, bias_node, in_shift, var_shift, out_shift)
        scale_node = add_constant(self.gm, node, f"int_ln_scale_{node.name}", out_scale.to(device))
        result = self.dequantize(node, codes, scale_node, val(node)[0].dtype)
        reference = functools.partial(F.layer_norm, normalized_shape=(width,), eps=node.args[4],
                                      weight=getattr(self.gm, weight.target) if weight is not None else None,
                                      bias=getattr(self.gm, bias.target) if bias is not None else None)
        result.meta["integer_site"] = (site_tag(site.key, "layer_norm", self.cfg.method, q, reference, self.scale_of[q])
                                       if chained else site_tag(site.key, "layer_norm", self.cfg.method, x, reference))
        for user in list(node.users):
            user.replace_all_uses_with(result)
            self.gm.graph.erase_node(user)
        self.gm.graph.erase_node(node)
        return result

    def linear(self, site: Site) -> fx.Node | str:
        """``x @ w.T + b`` => ``int_matmul(int_quantize(x, s), w_codes.T) * s * w_scale + b``."""
        node = site.node
        x, weight, bias = linear_parts(node)
        w = getattr(self.gm, weight.target)
        if w.shape[1] > matmul.MAX_DEPTH:
            return f"inner size {w.shape[1]} exceeds {matmul.MAX_DEPTH}"
        device, dtype = val(x).device, val(node).dtype
        codes, weight_scale = matmul.quantize_weight(w)
        s = self.scale(site, x, masked=False)
        q = self.call(node, ops.int_quantize.default, x, s, False, 8)
        w_codes = add_constant(self.gm, node, f"int_w_{weight.target}", codes.to(device))
        acc = self.call(node, ops.int_matmul.default, q, self.call(node, aten.permute.default, w_codes, [1, 0]))
        result = self.dequantize(node, acc, s, torch.float32)
        result = self.call(node, aten.mul.Tensor, result,
                           add_constant(self.gm, node, f"int_w_scale_{weight.target}", weight_scale.to(device)))
        b = None if bias is None else getattr(self.gm, bias.target)
        if b is not None:
            b32 = add_constant(self.gm, node, f"int_bias_{bias.target}", b.detach().to(torch.float32))
            result = self.call(node, aten.add.Tensor, result, b32)
        if dtype != torch.float32:
            result = insert_call(self.gm, node, aten._to_copy.default, (result,), {"dtype": dtype})
        result.meta["integer_site"] = site_tag(site.key, "linear", self.cfg.method, x,
                                               functools.partial(F.linear, weight=w, bias=b))
        return result

    def decompose_attention(self, site: Site) -> fx.Node | str:
        """SDPA -> matmul, scale, mask, softmax, matmul; returns the softmax node."""
        node = site.node
        args = sdpa_arguments(node)
        result = sdpa_result(node)
        if args is None or not isinstance(result, fx.Node):
            return "its arguments or outputs cannot be read"
        q, k, v = args["query"], args["key"], args["value"]
        mask = args.get("attn_mask", args.get("attn_bias"))
        if args.get("dropout_p", 0.0) or args.get("is_causal", False):
            return "dropout or is_causal is set"
        if val(q).shape[1] != val(k).shape[1] or args.get("enable_gqa", False):
            return "query and key head counts differ (grouped-query attention)"
        scale = args.get("scale") or 1.0 / math.sqrt(val(q).shape[-1])
        kt = self.call(result, aten.transpose.int, k, -2, -1)
        scores = self.call(result, aten.mul.Tensor, self.call(result, aten.matmul.default, q, kt), scale)
        if mask is not None:
            if val(mask).dtype == torch.bool:
                scores = self.call(result, aten.masked_fill.Scalar, scores,
                                   self.call(result, aten.logical_not.default, mask), float("-inf"))
            else:
                scores = self.call(result, aten.add.Tensor, scores, mask)
        probs = self.call(result, aten._softmax.default, scores, -1, False)
        out = self._with_strides_of(result, self.call(result, aten.matmul.default, probs, v))
        result.replace_all_uses_with(out)
        for dead in (result, node):
            if not dead.users and dead.graph is self.gm.graph:
                self.gm.graph.erase_node(dead)
        counters[GROUP]["sdpa => matmul, softmax, matmul"] += 1
        return probs

    def _with_strides_of(self, like: fx.Node, out: fx.Node) -> fx.Node:
        """``out`` laid out as ``like`` is: the views after an SDPA were captured for its strides."""
        strides = val(like).stride()
        if tuple(strides) == tuple(val(out).stride()):
            return out
        order = sorted(range(len(strides)), key=lambda d: -strides[d])
        dense = insert_call(self.gm, like, aten.clone.default, (self.call(like, aten.permute.default, out, order),),
                            {"memory_format": torch.contiguous_format})
        return self.call(like, aten.permute.default, dense, [order.index(d) for d in range(len(order))])


def codes_of_chain(node: fx.Node) -> fx.Node:
    """``node`` itself when it is integer codes, else the node it dequantises from."""
    return node if not val(node).is_floating_point() else node.args[0]


def integer_only(gm: fx.GraphModule, *, opts) -> PassResult:
    cfg: IntegerOnly | None = opts.integer
    if cfg is None:
        return PassResult(gm, False)
    # Constants are computed from the real weights; a compile may run inside the tracer's fake mode.
    with torch._subclasses.fake_tensor.unset_fake_temporarily():
        return _rewrite(gm, cfg)


def _rewrite(gm: fx.GraphModule, cfg: IntegerOnly) -> PassResult:
    rewriter = _Rewriter(gm, cfg)
    modified = False
    for site in find_sites(gm, sdpa=cfg.sdpa and "softmax" in cfg.ops):
        kind = "softmax" if site.kind == "sdpa" else site.kind
        if kind not in cfg.ops:
            continue
        node = site.node
        if site.kind == "sdpa":
            node = rewriter.decompose_attention(site)
            if isinstance(node, str):
                counters[GROUP][f"sdpa [not decomposed: {node}]"] += 1
                continue
            modified = True
        if kind == "softmax":
            new = rewriter.softmax(site, node)
        else:
            new = {"gelu": rewriter.gelu, "layer_norm": rewriter.layer_norm, "linear": rewriter.linear}[kind](site)
        if isinstance(new, str):  # the site stays float, and says why
            counters[GROUP][f"{kind} [not applied: {new}]"] += 1
            continue
        if kind != "layer_norm":  # the LayerNorm rewrite replaced the users of its output itself
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
        counters[GROUP][f"{kind} => {'int_matmul' if kind == 'linear' else f'int_{kind}'}"] += 1
        modified = True
    for dequantised, (_, _, scale) in rewriter.codes_of.items():  # GELU outputs only an integer LayerNorm read
        if not dequantised.users:
            chain = [dequantised]  # back to the int32 codes: [to dtype], mul, to float32
            while chain[-1] is not codes_of_chain(chain[-1]):
                chain.append(chain[-1].args[0])
            codes = chain.pop()  # its error is still measured, on the codes
            codes.meta["integer_site"] = dequantised.meta["integer_site"] | {"result_scale": rewriter.scale_of[codes]}
            for node in chain:
                gm.graph.erase_node(node)
            if not scale.users:
                gm.graph.erase_node(scale)
    if modified:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified)
