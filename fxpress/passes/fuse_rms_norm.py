"""Pass fuse_rms_norm: the RMSNorm chain of elementwise ops becomes one ``fxpress::rms_norm``.

Models write RMSNorm in Python, so it reaches the graph as five or six ops; one op gives the
codegen a single kernel family and later passes one node to look for. Matched: the Llama-family
form (``LlamaRMSNorm``, also Mistral, Qwen2, SmolLM), with or without its fp32 up-cast and with or
without a weight; Gemma's ``x * (1 + w)`` too, its ``1 + w`` taken as the weight. The matcher is
``fxpress/ir/rms_norm_match.py``. Before/after::

    %p = pow(%x, 2); %m = mean(%p, [-1], True); %a = add(%m, 1e-05); %r = rsqrt(%a)
    %n = mul(%x, %r); %y = mul(%w, %n)           ->   %y = fxpress.rms_norm(%x, %w, 1e-05)
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

import fxpress.ops  # noqa: F401  (registers torch.ops.fxpress)
from fxpress.ir.options import Options
from fxpress.ir.match import Match, Rule, apply_rules, insert_call
from fxpress.ir.rms_norm_match import rms_norm_at


def _replace(gm: fx.GraphModule, m: Match) -> fx.Node:
    ops = m.operands
    return insert_call(gm, m.root, torch.ops.fxpress.rms_norm.default, (ops["x"], ops["weight"], ops["eps"]))


RULES = (
    Rule("x * rsqrt(mean(x**2, -1) + eps) [* w] => rms_norm(x, w, eps)", rms_norm_at, _replace),
)


def fuse_rms_norm(gm: fx.GraphModule, *, opts: Options) -> PassResult:
    return PassResult(gm, apply_rules(gm, RULES, "fuse_rms_norm") > 0)
