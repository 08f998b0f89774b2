"""Triton kernels of the low-rank ops (``fxpress/ops/lowrank.py`` defines their semantics).

Each program owns a block of rows and keeps the rank-r intermediates of that block on chip:

- ``lowrank_linear``: ``p = x[rows] @ down.T`` (``[BM, R]``), then the output over blocks of
  columns, ``p @ up.T + bias``;
- ``lowrank_ffn``: ``p1 = x[rows] @ down1.T``; over blocks of the D-wide hidden layer,
  ``h = act(p1 @ up1[blk].T + b1)`` (gated: ``act(gate) * h``) is folded into
  ``t = sum h @ down2[:, blk].T`` (``[BM, R2]``); the output is ``t @ up2.T + b2``. Unlike
  FlashSVD's FFN kernel, whose grid also splits the output columns, nothing is recomputed: the
  D-wide activation is made once per row block and only rank-r accumulators live across blocks;
- ``lowrank_attention``: in passes over chunks of KV heads, ``lowrank_kv_kernel`` rebuilds each
  head's K and V from the rank-r factors once (normalised and rotated as the model does) into a
  scratch of at most ``KV_SCRATCH_BYTES``, then FlashAttention's online softmax runs over it, each
  query tile rebuilt from ``p`` and the head's slice of ``up``. Rebuilding K and V inside the
  attention loop instead would redo that projection for every block of queries (``S / BM`` times).
  With ``o_down``, one program per query block takes every head of the chunk and accumulates
  ``ctx_h @ o_down[:, head].T`` into the rank-r output.

A program reads all of its rows before writing any of them, and touches no other rows, so the
linear and FFN outputs may overwrite their input (the planner's in-place reuse). Matrix products
on fp32 run in full fp32 (``input_precision="ieee"``), as torch's matmul does by default, so the
fused ops match the unfused chain to rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fxpress.core.triton_types import dot_pad as _pad
from fxpress.ops.kernels import lowrank_library as library

SQRT1_2 = 0.7071067811865476
GELU, GELU_TANH, SILU, RELU = 0, 1, 2, 3
ACTIVATION_CODES = {"gelu": GELU, "gelu_tanh": GELU_TANH, "silu": SILU, "relu": RELU}
# The rebuilt K and V of one pass over KV heads (lowrank_attention): 16 MiB holds BERT-base's K and V
# for 4 of 12 heads at batch 16 x 512 in fp32, a third of what the unfused layer writes for them.
KV_SCRATCH_BYTES = 16 << 20
# Factor tiles are [rank, block] wide; software pipelining (several stages in flight) of those
# loads needs more shared memory than an H100 has at BERT-base ranks (seen: 312 KB > 227 KB).
NUM_STAGES = 1


def _precision(dtype: torch.dtype) -> str | None:
    """fp32 products in full fp32 (Triton's default would be TF32); others at their own precision."""
    return "ieee" if dtype == torch.float32 else None


@triton.jit
def _down_project(x, w, rows, row_mask, K, R, BM: tl.constexpr, BK: tl.constexpr, R_PAD: tl.constexpr,
                  PRECISION: tl.constexpr):
    """x[rows] @ w.T for w of shape [R, K]: a [BM, R_PAD] fp32 tile (columns >= R are zero)."""
    rank = tl.arange(0, R_PAD)
    acc = tl.zeros([BM, R_PAD], tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        xt = tl.load(x + rows[:, None] * K + ks[None, :], mask=row_mask[:, None] & (ks[None, :] < K), other=0.0)
        wt = tl.load(w + rank[None, :] * K + ks[:, None], mask=(ks[:, None] < K) & (rank[None, :] < R), other=0.0)
        acc += tl.dot(xt, wt, input_precision=PRECISION)
    return acc


@triton.jit
def _up_project(p, w, b, cols, R, N, HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr):
    """p @ w[cols].T (+ b[cols]) for w of shape [N, R]: a [BM, len(cols)] fp32 tile."""
    rank = tl.arange(0, R_PAD)
    wt = tl.load(w + cols[None, :] * R + rank[:, None], mask=(rank[:, None] < R) & (cols[None, :] < N), other=0.0)
    y = tl.dot(p.to(wt.dtype), wt, input_precision=PRECISION)
    if HAS_BIAS:
        y += tl.load(b + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def _activate(h, ACT: tl.constexpr):
    if ACT == 0:
        h = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    elif ACT == 1:
        inner = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        h = 0.5 * h * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0))
    elif ACT == 2:
        h = h / (1.0 + tl.exp(-h))
    else:
        h = tl.maximum(h, 0.0)
    return h


@triton.jit
def _store_rows(out, y, rows, row_mask, N, BN: tl.constexpr, n0):
    cols = n0 + tl.arange(0, BN)
    tl.store(out + rows[:, None] * N + cols[None, :], y.to(out.dtype.element_ty),
             mask=row_mask[:, None] & (cols[None, :] < N))


@triton.jit
def lowrank_linear_kernel(x, down, up, bias, out, M, K, R, N, HAS_BIAS: tl.constexpr, BM: tl.constexpr,
                          BK: tl.constexpr, R_PAD: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    row_mask = rows < M
    p = _down_project(x, down, rows, row_mask, K, R, BM, BK, R_PAD, PRECISION)
    for n0 in range(0, N, BN):
        y = _up_project(p, up, bias, n0 + tl.arange(0, BN), R, N, HAS_BIAS, R_PAD, PRECISION)
        _store_rows(out, y, rows, row_mask, N, BN, n0)


@triton.jit
def lowrank_ffn_kernel(x, down1, up1, bias1, gate_down, gate_up, gate_bias, down2, up2, bias2, out,
                       M, K, R1, D, RG, R2, N, ACT: tl.constexpr, GATED: tl.constexpr,
                       HAS_B1: tl.constexpr, HAS_GB: tl.constexpr, HAS_B2: tl.constexpr,
                       BM: tl.constexpr, BK: tl.constexpr, R1_PAD: tl.constexpr, RG_PAD: tl.constexpr,
                       BD: tl.constexpr, R2_PAD: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    row_mask = rows < M
    p1 = _down_project(x, down1, rows, row_mask, K, R1, BM, BK, R1_PAD, PRECISION)
    if GATED:
        pg = _down_project(x, gate_down, rows, row_mask, K, RG, BM, BK, RG_PAD, PRECISION)
    rank2 = tl.arange(0, R2_PAD)
    t = tl.zeros([BM, R2_PAD], tl.float32)
    for d0 in range(0, D, BD):
        hidden_cols = d0 + tl.arange(0, BD)
        h = _up_project(p1, up1, bias1, hidden_cols, R1, D, HAS_B1, R1_PAD, PRECISION)
        if GATED:
            g = _up_project(pg, gate_up, gate_bias, hidden_cols, RG, D, HAS_GB, RG_PAD, PRECISION)
            h = _activate(g, ACT) * h
        else:
            h = _activate(h, ACT)
        # Round the activation to the model dtype, as the unfused chain stores it.
        h = h.to(x.dtype.element_ty)
        w2 = tl.load(down2 + rank2[None, :] * D + hidden_cols[:, None],
                     mask=(hidden_cols[:, None] < D) & (rank2[None, :] < R2), other=0.0)
        t += tl.dot(h, w2, input_precision=PRECISION)
    for n0 in range(0, N, BN):
        y = _up_project(t, up2, bias2, n0 + tl.arange(0, BN), R2, N, HAS_B2, R2_PAD, PRECISION)
        _store_rows(out, y, rows, row_mask, N, BN, n0)


@triton.jit
def _head_columns(pt, up, bias, rank, cols, R, h, d, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
    """Columns ``cols`` of one head rebuilt from the factor rows ``pt``: pt @ up[h*d + cols].T + bias."""
    wt = tl.load(up + (h * d + cols[None, :]) * R + rank[:, None],
                 mask=(rank[:, None] < R) & (cols[None, :] < d), other=0.0)
    tile = tl.dot(pt, wt, input_precision=PRECISION)
    if HAS_BIAS:
        tile += tl.load(bias + h * d + cols, mask=cols < d, other=0.0).to(tl.float32)[None, :]
    return tile


@triton.jit
def _head_tile(p, up, bias, b, seq_rows, seq_mask, S, R, h, d, HAS_BIAS: tl.constexpr,
               R_PAD: tl.constexpr, D_PAD: tl.constexpr, PRECISION: tl.constexpr):
    """Rows ``seq_rows`` of one head rebuilt from its factors: p[b, rows] @ up[h*d:(h+1)*d].T + bias."""
    rank = tl.arange(0, R_PAD)
    pt = tl.load(p + (b * S + seq_rows[:, None]) * R + rank[None, :],
                 mask=seq_mask[:, None] & (rank[None, :] < R), other=0.0)
    return _head_columns(pt, up, bias, rank, tl.arange(0, D_PAD), R, h, d, HAS_BIAS, PRECISION)


@triton.jit
def _rotated_head_tile(p, up, bias, b, seq_rows, seq_mask, S, R, h, d, cos, sin, rotary_sb, norm, eps,
                       HAS_BIAS: tl.constexpr, ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr,
                       NORM: tl.constexpr, R_PAD: tl.constexpr, D_PAD: tl.constexpr, PRECISION: tl.constexpr):
    """``_head_tile`` RMS-normalised per row (``NORM``: q_norm / k_norm) and rotated (``ROTARY``:
    tile * cos + rotate(tile) * sin). The rotated tile is rebuilt from the partner rows of ``up``
    (column j of rotate_half(x) is -x[j + d/2] or x[j - d/2]; of the interleaved form -x[j + 1] or
    x[j - 1]), so no column shuffle is needed; the norm's row factor is the same for both."""
    rank = tl.arange(0, R_PAD)
    pt = tl.load(p + (b * S + seq_rows[:, None]) * R + rank[None, :],
                 mask=seq_mask[:, None] & (rank[None, :] < R), other=0.0)
    cols = tl.arange(0, D_PAD)
    tile = _head_columns(pt, up, bias, rank, cols, R, h, d, HAS_BIAS, PRECISION)
    if NORM:  # padded columns are 0, so the row sums cover the d channels only
        row_scale = 1.0 / tl.sqrt(tl.sum(tile * tile, 1) / d + eps)
        tile = tile * row_scale[:, None] * tl.load(norm + cols, mask=cols < d, other=0.0).to(tl.float32)[None, :]
    if ROTARY:
        if INTERLEAVED:
            first = cols % 2 == 0
            partner = tl.where(first, cols + 1, cols - 1)
        else:
            first = cols < d // 2
            partner = tl.where(first, cols + d // 2, cols - d // 2)
        turned = _head_columns(pt, up, bias, rank, partner, R, h, d, HAS_BIAS, PRECISION)
        turned = tl.where(first[None, :], -turned, turned)
        if NORM:
            turned = turned * row_scale[:, None] * tl.load(norm + partner, mask=partner < d,
                                                           other=0.0).to(tl.float32)[None, :]
        at = b * rotary_sb + seq_rows[:, None] * d + cols[None, :]
        inside = seq_mask[:, None] & (cols[None, :] < d)
        c = tl.load(cos + at, mask=inside, other=0.0).to(tl.float32)
        s = tl.load(sin + at, mask=inside, other=0.0).to(tl.float32)
        tile = tile * c + turned * s
    return tile


@triton.jit
def lowrank_kv_kernel(pk, k_up, k_bias, pv, v_up, v_bias, cos, sin, k_norm, keys, values, SK, RK, RV,
                      first_kv, CHUNK, d, norm_eps, rotary_sb,
                      HAS_KB: tl.constexpr, HAS_VB: tl.constexpr, ROTARY: tl.constexpr,
                      INTERLEAVED: tl.constexpr, NORM: tl.constexpr, BN: tl.constexpr, D_PAD: tl.constexpr,
                      RK_PAD: tl.constexpr, RV_PAD: tl.constexpr, PRECISION: tl.constexpr):
    """One block of keys of one (sequence, KV head) of the chunk: K (normalised and rotated as the
    model does) and V rebuilt from their factors, once, into ``keys`` / ``values`` [B, CHUNK, SK, D_PAD]."""
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    row_mask = rows < SK
    b = tl.program_id(1) // CHUNK
    j = tl.program_id(1) % CHUNK
    kv = first_kv + j
    k = _rotated_head_tile(pk, k_up, k_bias, b, rows, row_mask, SK, RK, kv, d, cos, sin, rotary_sb, k_norm,
                           norm_eps, HAS_KB, ROTARY, INTERLEAVED, NORM, RK_PAD, D_PAD, PRECISION)
    v = _head_tile(pv, v_up, v_bias, b, rows, row_mask, SK, RV, kv, d, HAS_VB, RV_PAD, D_PAD, PRECISION)
    at = ((b * CHUNK + j) * SK + rows[:, None]) * D_PAD + tl.arange(0, D_PAD)[None, :]
    tl.store(keys + at, k.to(keys.dtype.element_ty), mask=row_mask[:, None])
    tl.store(values + at, v.to(values.dtype.element_ty), mask=row_mask[:, None])


@triton.jit
def lowrank_attention_kernel(pq, q_up, q_bias, keys, values, mask, o_down, cos, sin, q_norm, out,
                             S, SK, RQ, RO, H, GROUP, first_kv, CHUNK, d, scale, norm_eps,
                             mask_sb, mask_sh, mask_sq, mask_sk, rotary_sb,
                             HAS_QB: tl.constexpr, MASK: tl.constexpr, BOOL_MASK: tl.constexpr,
                             CAUSAL: tl.constexpr, O_DOWN: tl.constexpr, ACCUMULATE: tl.constexpr,
                             ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr, NORM: tl.constexpr,
                             BM: tl.constexpr, BN: tl.constexpr, D_PAD: tl.constexpr, RQ_PAD: tl.constexpr,
                             RO_PAD: tl.constexpr, PRECISION: tl.constexpr):
    """Flash attention of the query heads of a chunk of KV heads over their K and V (made once by
    ``lowrank_kv_kernel``), each query tile rebuilt from its factors. With ``O_DOWN`` a program
    takes every head of the chunk and adds their projections to ``out`` (``ACCUMULATE``: chunks
    after the first add to what earlier ones wrote)."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    row_mask = rows < S
    heads_in_chunk = CHUNK * GROUP
    if O_DOWN:
        b = tl.program_id(1)
        first_head = first_kv * GROUP
        heads = heads_in_chunk
    else:
        b = tl.program_id(1) // heads_in_chunk
        first_head = first_kv * GROUP + tl.program_id(1) % heads_in_chunk
        heads = 1
    cols = tl.arange(0, D_PAD)
    rank_o = tl.arange(0, RO_PAD)
    projected = tl.zeros([BM, RO_PAD], tl.float32)
    for h in range(first_head, first_head + heads):
        kv_rows = (b * CHUNK + h // GROUP - first_kv) * SK
        q = _rotated_head_tile(pq, q_up, q_bias, b, rows, row_mask, S, RQ, h, d, cos, sin, rotary_sb, q_norm,
                               norm_eps, HAS_QB, ROTARY, INTERLEAVED, NORM, RQ_PAD, D_PAD, PRECISION)
        q = q * scale
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, D_PAD], tl.float32)
        for n0 in range(0, SK, BN):
            key_rows = n0 + tl.arange(0, BN)
            key_mask = key_rows < SK
            at = (kv_rows + key_rows[:, None]) * D_PAD + cols[None, :]
            k = tl.load(keys + at, mask=key_mask[:, None], other=0.0).to(tl.float32)
            v = tl.load(values + at, mask=key_mask[:, None], other=0.0).to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            allowed = row_mask[:, None] & key_mask[None, :]
            if CAUSAL:
                allowed = allowed & (key_rows[None, :] <= rows[:, None])
            if MASK:
                m_ptr = mask + b * mask_sb + h * mask_sh + rows[:, None] * mask_sq + key_rows[None, :] * mask_sk
                if BOOL_MASK:
                    allowed = allowed & (tl.load(m_ptr, mask=allowed, other=0) != 0)
                else:
                    s += tl.load(m_ptr, mask=allowed, other=0.0).to(tl.float32)
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a fully masked row so far
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
            m_i = m_new
        # Rows with every key masked give 0, as torch's SDPA does.
        context = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
        if O_DOWN:
            wt = tl.load(o_down + rank_o[None, :] * (H * d) + h * d + cols[:, None],
                         mask=(cols[:, None] < d) & (rank_o[None, :] < RO), other=0.0)
            projected += tl.dot(context.to(wt.dtype), wt, input_precision=PRECISION)
        else:
            # out is [B, S, H, d] in memory (SDPA's layout, seen as [B, H, S, d]).
            tl.store(out + ((b * S + rows[:, None]) * H + h) * d + cols[None, :],
                     context.to(out.dtype.element_ty), mask=row_mask[:, None] & (cols[None, :] < d))
    if O_DOWN:
        at = out + (b * S + rows[:, None]) * RO + rank_o[None, :]
        inside = row_mask[:, None] & (rank_o[None, :] < RO)
        if ACCUMULATE:
            projected += tl.load(at, mask=inside, other=0.0).to(tl.float32)
        tl.store(at, projected.to(out.dtype.element_ty), mask=inside)


# Launchers: what generated wrappers call, with the op's arguments plus ``out``. -----------------
#
# On a GPU a launch of FUSED_MAX_ROWS rows or more runs the op through library kernels instead
# (``lowrank_library.py``: cuBLAS GEMMs with the wide intermediates a bounded block at a time, and
# SDPA). Measured on an H200 at BERT-base shapes (bench/results/lowrank-gpu-h200-2026-12-04b.md),
# the FFN kernel above took 1.7-481x the unfused chain's time from 16 to 8192 rows, the library
# order 0.7-2.2x; the attention kernel 32x in fp32 and 5.4x in fp16, the library order 2.3x and
# 7.0x at its default blocks (1.4x and 3.6x at 32 MiB). On whole models the kernels took 69x
# (fp32 BERT-base) and 9.3x (a SmolLM2-shaped decoder) the unfused time, the library order 1.8x and
# 0.82x. So every CUDA launch goes there by default; a larger value keeps the single kernels, which
# hold no intermediate in memory at all, for launches below it. The interpreter runs the kernels.
FUSED_MAX_ROWS = 0


def _streams(x: torch.Tensor) -> bool:
    return x.is_cuda and x.numel() >= FUSED_MAX_ROWS * x.shape[-1]


_DUMMY: dict[torch.device, torch.Tensor] = {}


def _ptr(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A pointer argument for an absent optional tensor (never read: its HAS_ flag is off)."""
    if t is not None:
        return t
    if like.device not in _DUMMY:
        _DUMMY[like.device] = torch.zeros(1, dtype=like.dtype, device=like.device)
    return _DUMMY[like.device]


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    flat = x.reshape(-1, x.shape[-1])
    if not flat.is_contiguous():
        raise ValueError(f"lowrank kernels need x contiguous in its rows, got strides {x.stride()}")
    return flat, flat.shape[0]


def lowrank_linear(x, down, up, bias, out, BM: int = 32, BK: int = 32, BN: int = 64) -> None:
    if _streams(x):
        return library.linear(x, down, up, bias, out)
    flat, rows = _rows(x)
    R, K = down.shape
    N = up.shape[0]
    lowrank_linear_kernel[(triton.cdiv(rows, BM),)](
        flat, down, up, _ptr(bias, up), out, rows, K, R, N, HAS_BIAS=bias is not None,
        BM=BM, BK=BK, R_PAD=_pad(R), BN=BN, PRECISION=_precision(x.dtype), num_stages=NUM_STAGES)


def lowrank_ffn(x, down1, up1, bias1, down2, up2, bias2, activation, gate_down, gate_up, gate_bias, out,
                BM: int = 16, BK: int = 32, BD: int = 32, BN: int = 64) -> None:
    if _streams(x):
        return library.ffn(x, down1, up1, bias1, down2, up2, bias2, activation, gate_down, gate_up, gate_bias, out)
    flat, rows = _rows(x)
    R1, K = down1.shape
    D, R2, N = up1.shape[0], down2.shape[0], up2.shape[0]
    RG = gate_down.shape[0] if gate_down is not None else 1
    lowrank_ffn_kernel[(triton.cdiv(rows, BM),)](
        flat, down1, up1, _ptr(bias1, up1), _ptr(gate_down, up1), _ptr(gate_up, up1), _ptr(gate_bias, up1),
        down2, up2, _ptr(bias2, up2), out, rows, K, R1, D, RG, R2, N,
        ACT=ACTIVATION_CODES[activation], GATED=gate_down is not None, HAS_B1=bias1 is not None,
        HAS_GB=gate_bias is not None, HAS_B2=bias2 is not None, BM=BM, BK=BK, R1_PAD=_pad(R1),
        RG_PAD=_pad(RG), BD=BD, R2_PAD=_pad(R2), BN=BN, PRECISION=_precision(x.dtype),
        num_stages=NUM_STAGES)


def lowrank_attention(pq, q_up, q_bias, pk, k_up, k_bias, pv, v_up, v_bias, num_heads, num_kv_heads,
                      attn_mask, is_causal, scale, o_down, cos, sin, rotary_interleaved, q_norm, k_norm,
                      norm_eps, out, BM: int = 32, BN: int = 32) -> None:
    if _streams(pq):
        return library.attention(pq, q_up, q_bias, pk, k_up, k_bias, pv, v_up, v_bias, num_heads, num_kv_heads,
                                 attn_mask, is_causal, scale, o_down, cos, sin, rotary_interleaved, q_norm, k_norm,
                                 norm_eps, out)
    batch, S, RQ = pq.shape
    SK, RK, RV = pk.shape[1], pk.shape[2], pv.shape[2]
    d = q_up.shape[0] // num_heads
    if scale is None:
        scale = d ** -0.5
    if attn_mask is not None:
        attn_mask = attn_mask.expand(batch, num_heads, S, SK)  # a view: broadcast dims get stride 0
        strides = attn_mask.stride()
    else:
        strides = (0, 0, 0, 0)
    if cos is not None:
        cos, sin = cos.contiguous(), sin.contiguous()
    rotary_sb = 0 if cos is None or cos.shape[0] == 1 else S * d
    for t in (pq, pk, pv):
        if not t.is_contiguous():
            raise ValueError(f"lowrank_attention kernel needs contiguous p factors, got strides {t.stride()}")
    group, d_pad = num_heads // num_kv_heads, _pad(d)
    chunk = kv_chunk(batch, SK, d_pad, pq.element_size(), num_kv_heads)
    keys = torch.empty(2, batch, chunk, SK, d_pad, dtype=pq.dtype, device=pq.device)
    RO = o_down.shape[0] if o_down is not None else 1
    flags = dict(ROTARY=cos is not None, INTERLEAVED=bool(rotary_interleaved), NORM=q_norm is not None,
                 D_PAD=d_pad, PRECISION=_precision(pq.dtype), num_stages=NUM_STAGES)
    for first_kv in range(0, num_kv_heads, chunk):
        heads = min(chunk, num_kv_heads - first_kv)
        lowrank_kv_kernel[(triton.cdiv(SK, BN), batch * heads)](
            pk, k_up, _ptr(k_bias, k_up), pv, v_up, _ptr(v_bias, v_up), _ptr(cos, k_up), _ptr(sin, k_up),
            _ptr(k_norm, k_up), keys[0], keys[1], SK, RK, RV, first_kv, heads, d, float(norm_eps), rotary_sb,
            HAS_KB=k_bias is not None, HAS_VB=v_bias is not None, BN=BN, RK_PAD=_pad(RK), RV_PAD=_pad(RV),
            **flags)
        grid = (triton.cdiv(S, BM), batch if o_down is not None else batch * heads * group)
        lowrank_attention_kernel[grid](
            pq, q_up, _ptr(q_bias, q_up), keys[0], keys[1], _ptr(attn_mask, q_up), _ptr(o_down, q_up),
            _ptr(cos, q_up), _ptr(sin, q_up), _ptr(q_norm, q_up), out, S, SK, RQ, RO, num_heads, group, first_kv,
            heads, d, float(scale), float(norm_eps), *strides, rotary_sb,
            HAS_QB=q_bias is not None, MASK=attn_mask is not None,
            BOOL_MASK=attn_mask is not None and attn_mask.dtype == torch.bool, CAUSAL=bool(is_causal),
            O_DOWN=o_down is not None, ACCUMULATE=first_kv > 0, BM=BM, BN=BN, RQ_PAD=_pad(RQ), RO_PAD=_pad(RO),
            **flags)


def kv_chunk(batch: int, seq_k: int, d_pad: int, element_size: int, kv_heads: int) -> int:
    """How many KV heads' rebuilt K and V one pass holds: as many as fit in KV_SCRATCH_BYTES (at
    least one), so the scratch stays a bounded share of the full K and V while the attention
    launch still has enough programs to fill the GPU."""
    per_head = 2 * batch * seq_k * d_pad * element_size
    return max(1, min(kv_heads, KV_SCRATCH_BYTES // max(per_head, 1)))
