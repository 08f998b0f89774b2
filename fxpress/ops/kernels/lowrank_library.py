"""The low-rank ops on a GPU through library kernels: cuBLAS GEMMs and SDPA.

The single Triton kernels of ``lowrank.py`` keep every rank-r intermediate on chip but compute the
products themselves; on an H200 at BERT-base shapes (ranks 192 and 307) they took 32-481x the
unfused chain's time in fp32 and 1.7-10x in fp16, at 16 to 8192 rows
(bench/results/lowrank-gpu-h200-2026-12-04b.md). These run the unfused model's own GEMMs, in an
order that keeps the wide intermediates a bounded block at a time:

- ``linear``: ``p = x @ down.T``, then ``out = p @ up.T + bias``. The rank-r ``p`` is the narrowest
  value of the chain, so nothing needs streaming.
- ``ffn``: the reference's order (``fxpress/ops/lowrank.py``) over blocks of rows whose D-wide
  hidden layer holds about ``CUDA_BLOCK_BYTES``, each block through the whole chain.
- ``attention``: a few whole sequences per step, all heads at once: three GEMMs rebuild the step's
  Q, K and V, one SDPA call (FlashAttention or memory-efficient) attends, one GEMM projects the
  context onto ``o_down``. A step holds about ``CUDA_BLOCK_BYTES`` of Q, K, V and context.

``CUDA_BLOCK_BYTES`` trades memory for time: each step costs a fixed ~0.1-0.2 ms of launches, and
blocks of fewer rows fill fewer SMs. Measured on whole models against the unfused ones (time,
peak): fp32 BERT-base at 16 x 512 is 2.39x / 0.36x at 4 MiB, 1.90x / 0.36x at 8, 1.81x / 0.39x at
16 and 1.52x / 0.52x at 32; in fp16 1.16x / 0.77x at 16 MiB and 1.57x / 0.89x at 32; the
SmolLM2-shaped decoder (1 x 2048) 0.82x / 0.22x at 16 MiB in fp32. 16 MiB is the default: the best
fp16 time, and within 3 % of the best fp32 decoder time.

The triton target's launchers call these on CUDA tensors (without re-checking arguments the
compiled graph already checked). They run on any device; the tests run them on CPU tensors against
the references.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fxpress.ops.lowrank import _block_mask, ffn_over_row_blocks, head_normed, rotated

CUDA_BLOCK_BYTES = 16 << 20


def _block_elements(like: torch.Tensor) -> int:
    return max(1, CUDA_BLOCK_BYTES // like.element_size())


def _addmm(bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None):
    if bias is None:
        return torch.mm(a, b, out=out)
    return torch.addmm(bias, a, b, out=out)


def linear(x, down, up, bias, out) -> None:
    flat = x.reshape(-1, x.shape[-1])
    _addmm(bias, flat @ down.T, up.T, out=out.view(-1, up.shape[0]))


def ffn(x, down1, up1, bias1, down2, up2, bias2, activation, gate_down, gate_up, gate_bias, out) -> None:
    ffn_over_row_blocks(x, down1, up1, bias1, down2, up2, bias2, activation, gate_down, gate_up, gate_bias, out,
                        _block_elements(x))


def attention(pq, q_up, q_bias, pk, k_up, k_bias, pv, v_up, v_bias, num_heads, num_kv_heads, attn_mask,
              is_causal, scale, o_down, cos, sin, rotary_interleaved, q_norm, k_norm, norm_eps, out) -> None:
    """``out`` is [B, H, S, d] (any strides), or [B, S, rank_o] with ``o_down``."""
    batch, seq, seq_k = pq.shape[0], pq.shape[1], pk.shape[1]
    width = q_up.shape[0]
    group = num_heads // num_kv_heads
    # Q, the context and its merged-heads copy; K and V (repeated for GQA); rotation's temporaries;
    # the mask made additive. An upper bound: SDPA's output usually merges heads as a view.
    rotation = 2 * seq * width if cos is not None else 0
    masked = seq * seq_k if attn_mask is not None else 0
    per_sequence = (3 * seq + 2 * seq_k) * width + rotation + masked
    step = max(1, _block_elements(pq) // per_sequence)

    def heads(p, up, bias, n):  # [b, S, rank] -> a [b, n, S, d] view of the rebuilt projection
        y = _addmm(bias, p.reshape(-1, p.shape[-1]), up.T)
        return y.view(p.shape[0], p.shape[1], n, -1).transpose(1, 2)

    def per_batch(t, rows):  # a tensor broadcast over the batch, or its rows of it
        return t if t is None or t.shape[0] == 1 else t[rows]

    for start in range(0, batch, step):
        rows = slice(start, min(start + step, batch))
        c, s = per_batch(cos, rows), per_batch(sin, rows)
        q = rotated(head_normed(heads(pq[rows], q_up, q_bias, num_heads), q_norm, norm_eps), c, s, rotary_interleaved)
        k = rotated(head_normed(heads(pk[rows], k_up, k_bias, num_kv_heads), k_norm, norm_eps), c, s,
                    rotary_interleaved)
        v = heads(pv[rows], v_up, v_bias, num_kv_heads)
        if group > 1:  # every query head its KV head, as repeat_kv does (SDPA's GQA is not on every backend)
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        mask = per_batch(attn_mask, rows)
        if mask is not None and mask.dtype == torch.bool:  # as the reference: -inf where a key is hidden
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        if mask is not None and is_causal:
            mask = mask + _block_mask(None, 0, slice(0, seq), seq_k, True, q.dtype, q.device)
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
                                                 scale=scale)
        if mask is not None:  # a query that sees no key gets 0, as SDPA's math backend (the reference) gives
            context.masked_fill_(torch.isneginf(mask).all(-1, keepdim=True), 0.0)
        if o_down is None:
            out[rows].copy_(context)
            continue
        merged, target = context.transpose(1, 2).reshape(-1, width), out[rows]
        if target.is_contiguous():
            torch.mm(merged, o_down.T, out=target.view(-1, o_down.shape[0]))
        else:
            target.copy_((merged @ o_down.T).view(target.shape))
