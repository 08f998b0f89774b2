"""SDPA on the cpp target: ATen's CPU attention call (``_scaled_dot_product_flash_attention_for_cpu``,
what SDPA becomes when captured for the CPU) runs ``fxpress/ops/cpp/dense_attention.cpp``, which
reads q, k and v through their strides (the projections' outputs, with no copy) and writes the
output straight into its planned slot (ATen returns a new tensor the wrapper copies in)."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxpress.codegen.render import render
from fxpress.codegen.schedule import Kernel
from fxpress.codegen.targets.base import GeneratedKernel
from fxpress.codegen.targets.op_launch import schema_ordered_arguments
from fxpress.ir.match import val

SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default


def is_attention(kernel: Kernel, nodes: dict[str, fx.Node]) -> bool:
    return nodes[kernel.nodes[0]].target is SDPA


def attention_refusal(kernel: Kernel, nodes: dict[str, fx.Node]) -> str | None:
    """Why this SDPA call stays ATen's, or None when the C++ kernel runs it."""
    node = nodes[kernel.nodes[0]]
    query, key, value, dropout_p, _, attn_mask, _ = schema_ordered_arguments(node)
    users = [nodes[n] for n in kernel.nodes[1:]]
    if any(u.target is not operator.getitem or u.args[1] != 0 for u in users):
        return "SDPA's logsumexp is read: ATen's kernel computes it"
    if dropout_p != 0:
        return f"SDPA with dropout_p={dropout_p}: the C++ kernel has no dropout"
    tensors = [val(t) for t in (query, key, value)]
    if any(t.dtype != torch.float32 or t.dim() != 4 for t in tensors):
        return "the C++ attention kernel runs 4-D float32 q, k and v; this call has " \
               + ", ".join(f"{t.dtype} {t.dim()}-D" for t in tensors)
    (_, heads, _, d), (_, kv_heads, seq_k, dk), (_, kv_heads_v, seq_v, _) = (t.shape for t in tensors)
    if d != dk or kv_heads != kv_heads_v or seq_k != seq_v:
        return "SDPA with key and value shapes the C++ kernel does not pair"
    if not isinstance(heads, int) or not isinstance(kv_heads, int) or heads % kv_heads:
        return f"{heads} query heads over {kv_heads} KV heads"
    if isinstance(seq_k, int) and seq_k == 0:
        return "SDPA over no keys"
    if attn_mask is not None and val(attn_mask).dtype not in (torch.float32, torch.bool):
        return f"an attention mask of {val(attn_mask).dtype}"
    return None


def emit_attention(kernel: Kernel, nodes: dict[str, fx.Node]) -> GeneratedKernel:
    node = nodes[kernel.nodes[0]]
    query, key, value, _, is_causal, attn_mask, scale = schema_ordered_arguments(node)
    (output,) = kernel.nodes[1:]
    inputs = tuple(a.name for a in (query, key, value, attn_mask) if isinstance(a, fx.Node))
    args = ", ".join(render(a) for a in (query, key, value, attn_mask, is_causal, scale))
    return GeneratedKernel(kernel.name, "", inputs, (output,), launch=f"dense_attention({args}, {output})",
                           imports=("from fxpress.ops.cpp.dense_attention import dense_attention",))
