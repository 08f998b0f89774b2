"""Triton kernels of the KIVI cache (``fxpress/kv/quant.py`` and ``fxpress/kv/stores.py`` define
their semantics; the CPU path is that torch code).

- ``quantize_keys``: one program per (sequence-head, group of G tokens): per-channel min/max over
  the group, codes packed 32/bits per int32 along tokens;
- ``quantize_values``: one program per (sequence-head, block of tokens): per-token min/max over
  groups of G channels, codes packed along channels;
- ``decode_attention``: one program per (sequence, KV head) for a single new token: its G query
  heads attend to the packed keys and values, dequantised tile by tile in registers, then to the
  full-precision residual window, the sink tokens and the new token itself, with an online softmax. No
  dequantised copy of the cache is ever written. Pre-RoPE keys (``KIVI(rope_theta=...)``) are
  turned to their positions in registers, from the shared cos/sin table of ``fxpress.kv.rope_frame``.

Quantisation rounds exactly as the reference: scale and min rounded to the storage dtype first,
IEEE division, round half to even, no fused multiply-adds; the codes match bit for bit (keys with
clipped ranges too: the same candidate ranges, the same error, the same ties). Products on fp32 run in full fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fxpress.core.triton_types import dot_pad as _pad
import fxpress.kv.quant as quant
import fxpress.kv.rope_frame as rope_frame
from fxpress.kv.kernels import decode_step

EXACT_ROWS = tl.constexpr(16)  # full-precision tokens per step of _exact_block (the smallest tl.dot side)

@triton.jit
def _round_half_even(x):
    f = tl.floor(x)
    d = x - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, tl.where(odd, f + 1.0, f)))


@triton.jit
def _codes(x, lo, scale, BITS: tl.constexpr):
    s = scale.to(tl.float32)
    m = lo.to(tl.float32)
    q = tl.where(s > 0.0, tl.math.div_rn(x - m, tl.where(s > 0.0, s, 1.0)), 0.0)
    q = tl.minimum(tl.maximum(_round_half_even(q), 0.0), (1 << BITS) - 1.0)
    return q.to(tl.int32)


@triton.jit
def _range(lo, hi, out_ty, BITS: tl.constexpr):
    lo_s = lo.to(out_ty)
    scale = tl.math.div_rn(hi - lo_s.to(tl.float32), (1 << BITS) - 1.0).to(out_ty)
    return lo_s, scale


@triton.jit
def _try_range(tile, lo, hi, best_lo, best_scale, best_err, out_ty, BITS: tl.constexpr):
    """Keep (lo, scale) per channel where its squared error over the group is lower than the best."""
    lo_s, scale_s = _range(lo, hi, out_ty, BITS)
    c = _codes(tile, lo_s[None, :], scale_s[None, :], BITS).to(tl.float32)
    d = c * scale_s.to(tl.float32)[None, :] + lo_s.to(tl.float32)[None, :] - tile
    err = tl.sum(d * d, 0)
    better = err < best_err
    return tl.where(better, lo_s, best_lo), tl.where(better, scale_s, best_scale), tl.where(better, err, best_err)


@triton.jit
def _quantize_keys_kernel(x, codes, scale, lo, n_groups, D: tl.constexpr, G: tl.constexpr,
                          BITS: tl.constexpr, PW: tl.constexpr, CLIP: tl.constexpr):
    seq, group = tl.program_id(0), tl.program_id(1)
    tokens = group * G + tl.arange(0, G)
    ch = tl.arange(0, D)
    n = n_groups * G
    tile = tl.load(x + seq * n * D + tokens[:, None] * D + ch[None, :]).to(tl.float32)
    out_ty = scale.dtype.element_ty
    low, high = tl.min(tile, 0), tl.max(tile, 0)
    lo_s, scale_s = _range(low, high, out_ty, BITS)
    if CLIP:  # quant.CLIP_RATIOS, in order; ties keep the wider range
        mid = (low + high) / 2
        half = (high - low) / 2
        err = tl.full([D], float("inf"), tl.float32)
        lo_s, scale_s, err = _try_range(tile, mid - 1.0 * half, mid + 1.0 * half, lo_s, scale_s, err, out_ty, BITS)
        lo_s, scale_s, err = _try_range(tile, mid - 0.9 * half, mid + 0.9 * half, lo_s, scale_s, err, out_ty, BITS)
        lo_s, scale_s, err = _try_range(tile, mid - 0.8 * half, mid + 0.8 * half, lo_s, scale_s, err, out_ty, BITS)
        lo_s, scale_s, err = _try_range(tile, mid - 0.7 * half, mid + 0.7 * half, lo_s, scale_s, err, out_ty, BITS)
        lo_s, scale_s, err = _try_range(tile, mid - 0.6 * half, mid + 0.6 * half, lo_s, scale_s, err, out_ty, BITS)
    tl.store(scale + (seq * n_groups + group) * D + ch, scale_s)
    tl.store(lo + (seq * n_groups + group) * D + ch, lo_s)
    c = _codes(tile, lo_s[None, :], scale_s[None, :], BITS)
    shifts = tl.arange(0, PW) * BITS
    words = tl.sum(tl.reshape(c, [G // PW, PW, D]) << shifts[None, :, None], 1)
    rows = group * (G // PW) + tl.arange(0, G // PW)
    tl.store(codes + seq * (n // PW) * D + rows[:, None] * D + ch[None, :], words)


@triton.jit
def _quantize_values_kernel(x, codes, scale, lo, n, D: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr,
                            PW: tl.constexpr, BT: tl.constexpr):
    seq, block = tl.program_id(0), tl.program_id(1)
    tokens = block * BT + tl.arange(0, BT)
    ok = tokens < n
    ch = tl.arange(0, D)
    tile = tl.load(x + seq * n * D + tokens[:, None] * D + ch[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    grouped = tl.reshape(tile, [BT, D // G, G])
    lo_s, scale_s = _range(tl.min(grouped, 2), tl.max(grouped, 2), scale.dtype.element_ty, BITS)
    gs = tl.arange(0, D // G)
    tl.store(scale + (seq * n + tokens[:, None]) * (D // G) + gs[None, :], scale_s, mask=ok[:, None])
    tl.store(lo + (seq * n + tokens[:, None]) * (D // G) + gs[None, :], lo_s, mask=ok[:, None])
    c = tl.reshape(_codes(grouped, lo_s[:, :, None], scale_s[:, :, None], BITS), [BT, D // PW, PW])
    shifts = tl.arange(0, PW) * BITS
    words = tl.sum(c << shifts[None, None, :], 2)
    ws = tl.arange(0, D // PW)
    tl.store(codes + (seq * n + tokens[:, None]) * (D // PW) + ws[None, :], words, mask=ok[:, None])


def _check(x: torch.Tensor, bits: int, group: int) -> tuple[int, int, int]:
    if x.dim() != 4 or not x.is_contiguous():
        raise ValueError(f"KIVI quantisation expects contiguous [B, H, n, d] tensors, got {tuple(x.shape)}")
    per = quant.codes_per_word(bits)
    b, h, n, d = x.shape
    if d % group or group % per or n % group:
        raise ValueError(f"KIVI quantisation of {tuple(x.shape)}: head_dim and tokens must be multiples of "
                         f"group_size {group}, itself a multiple of {per}")
    return b * h, n, d


def quantize_keys(x: torch.Tensor, bits: int, group: int, dtype: torch.dtype, clip: bool = False
                  ) -> dict[str, torch.Tensor]:
    """Keys ``[B, H, n, d]`` (``n`` a multiple of ``group``) -> packed codes ``[B, H, n/pw, d]``,
    scale and min ``[B, H, n/group, d]``; ``clip`` as in :func:`fxpress.kv.quant.quantize`."""
    if clip and quant.CLIP_RATIOS != (1.0, 0.9, 0.8, 0.7, 0.6):
        raise RuntimeError("the keys kernel hard-codes quant.CLIP_RATIOS; update both together")
    seqs, n, d = _check(x, bits, group)
    per = quant.codes_per_word(bits)
    b, h = x.shape[:2]
    codes = torch.empty(b, h, n // per, d, dtype=torch.int32, device=x.device)
    scale = torch.empty(b, h, n // group, d, dtype=dtype, device=x.device)
    lo = torch.empty_like(scale)
    # No fused multiply-adds: the codes must round exactly as the torch reference does.
    _quantize_keys_kernel[(seqs, n // group)](x, codes, scale, lo, n // group, D=d, G=group, BITS=bits, PW=per,
                                              CLIP=clip, enable_fp_fusion=False)
    return {"k_codes": codes, "k_scale": scale, "k_lo": lo}


def quantize_values(x: torch.Tensor, bits: int, group: int, dtype: torch.dtype, block: int = 16
                    ) -> dict[str, torch.Tensor]:
    """Values ``[B, H, n, d]`` -> packed codes ``[B, H, n, d/pw]``, scale and min ``[B, H, n, d/group]``."""
    seqs, n, d = _check(x, bits, group)
    per = quant.codes_per_word(bits)
    b, h = x.shape[:2]
    codes = torch.empty(b, h, n, d // per, dtype=torch.int32, device=x.device)
    scale = torch.empty(b, h, n, d // group, dtype=dtype, device=x.device)
    lo = torch.empty_like(scale)
    _quantize_values_kernel[(seqs, triton.cdiv(n, block))](x, codes, scale, lo, n, D=d, G=group, BITS=bits, PW=per,
                                                            BT=block, enable_fp_fusion=False)
    return {"v_codes": codes, "v_scale": scale, "v_lo": lo}


@triton.jit
def _online_update(q, k, v, valid, m, l, acc, scale):
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    p = tl.exp(s - m_new[:, None])
    correction = tl.exp(m - m_new)
    l = l * correction + tl.sum(p, 1)
    acc = acc * correction[:, None] + tl.dot(p, v, input_precision="ieee")
    return m_new, l, acc


@triton.jit
def _exact_block(qt, kp, vp, seq, n, cap, m, l, acc, scale, D: tl.constexpr):
    """The first ``n`` of ``cap`` full-precision tokens of this (sequence, head), EXACT_ROWS at a
    time: a whole residual window of 128-wide heads would not fit in shared memory."""
    ch = tl.arange(0, D)
    for start in range(0, n, EXACT_ROWS):
        at = start + tl.arange(0, EXACT_ROWS)
        ok = at < n
        k = tl.load(kp + (seq * cap + at[:, None]) * D + ch[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        v = tl.load(vp + (seq * cap + at[:, None]) * D + ch[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        m, l, acc = _online_update(qt, k, v, ok, m, l, acc, scale)
    return m, l, acc


@triton.jit
def _turned_keys(k, kc, ks, kl, seq, start, group, n_sink, cap_quant, rope_cos, rope_sin, rope_stride, shifts,
                 mask_bits, D: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr, PW: tl.constexpr):
    """The dequantised pre-RoPE key tile ``k [G, D]`` of quantised tokens ``start ..`` turned to
    positions ``n_sink + start ..``: ``k * cos + rotate_half(k) * sin``."""
    ch = tl.arange(0, D)
    partner = (ch + D // 2) % D
    words = tl.load(kc + (seq * (cap_quant // PW) + start // PW + tl.arange(0, G // PW)[:, None]) * D + partner[None, :])
    codes = tl.reshape((words[:, None, :] >> shifts[None, :, None]) & mask_bits, [G, D]).to(tl.float32)
    scale = tl.load(ks + (seq * (cap_quant // G) + group) * D + partner).to(tl.float32)
    lo = tl.load(kl + (seq * (cap_quant // G) + group) * D + partner).to(tl.float32)
    k_partner = codes * scale[None, :] + lo[None, :]
    at = (ch % (D // 2))[None, :] * rope_stride + (n_sink + start + tl.arange(0, G))[:, None]
    cos = tl.load(rope_cos + at)
    sin = tl.load(rope_sin + at)
    sign = tl.where(ch < D // 2, -1.0, 1.0)
    return k * cos + sign[None, :] * k_partner * sin


@triton.jit
def _decode_kernel(q, qk, kc, ks, kl, vc, vs, vl, kr, vr, ksk, vsk, kn, vn, part_acc, part_m, part_l, n_quant, n_res,
                   n_sink, cap_quant, cap_res, cap_sink, tokens_per_split, n_splits, scale, rope_cos, rope_sin,
                   rope_stride, GQ: tl.constexpr, GQ_PAD: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
                   BITS: tl.constexpr, PW: tl.constexpr, KD: tl.constexpr, KD_PAD: tl.constexpr, ROPE: tl.constexpr):
    # Split-K over the quantised tokens (flash-decoding): program (seq, split) folds its share into
    # a partial (max, sum, acc); the last split also takes the residual window, the sinks and the
    # new token. decode_attention() combines the partials. The quantised keys hold KD of the D
    # channels (ThinK; KD = D without pruning), met by the query's kept channels `qk`. ROPE:
    # pre-RoPE keys (KD = D), turned to their positions as they are read: channel c's partner
    # c +- D/2 is dequantised from its own codes (a register tile cannot be permuted).
    seq, split = tl.program_id(0), tl.program_id(1)
    ch = tl.arange(0, D)
    rows = tl.arange(0, GQ_PAD)
    row_ok = rows < GQ
    # The query heads of this KV head are consecutive: rows of one tile.
    qt = tl.load(q + (seq * GQ + rows[:, None]) * D + ch[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    m = tl.full([GQ_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GQ_PAD], tl.float32)
    acc = tl.zeros([GQ_PAD, D], tl.float32)
    kch = tl.arange(0, KD_PAD)
    kok = kch < KD
    qkt = tl.load(qk + (seq * GQ + rows[:, None]) * KD + kch[None, :], mask=row_ok[:, None] & kok[None, :],
                  other=0.0).to(tl.float32)
    shifts = tl.arange(0, PW) * BITS
    mask_bits = (1 << BITS) - 1
    tok = tl.arange(0, G)
    first = split * tokens_per_split
    for start in range(first, tl.minimum(first + tokens_per_split, n_quant), G):
        group = start // G
        words = tl.load(kc + (seq * (cap_quant // PW) + start // PW + tl.arange(0, G // PW)[:, None]) * KD + kch[None, :],
                        mask=kok[None, :], other=0)
        codes = tl.reshape((words[:, None, :] >> shifts[None, :, None]) & mask_bits, [G, KD_PAD]).to(tl.float32)
        k_scale = tl.load(ks + (seq * (cap_quant // G) + group) * KD + kch, mask=kok, other=0.0).to(tl.float32)
        k_lo = tl.load(kl + (seq * (cap_quant // G) + group) * KD + kch, mask=kok, other=0.0).to(tl.float32)
        k = codes * k_scale[None, :] + k_lo[None, :]
        if ROPE:
            k = _turned_keys(k, kc, ks, kl, seq, start, group, n_sink, cap_quant, rope_cos, rope_sin, rope_stride,
                             shifts, mask_bits, D, G, BITS, PW)
        vw = tl.load(vc + (seq * cap_quant + start + tok[:, None]) * (D // PW) + tl.arange(0, D // PW)[None, :])
        vcodes = tl.reshape((vw[:, :, None] >> shifts[None, None, :]) & mask_bits, [G, D // G, G]).to(tl.float32)
        v_at = (seq * cap_quant + start + tok[:, None]) * (D // G) + tl.arange(0, D // G)[None, :]
        v_scale = tl.load(vs + v_at).to(tl.float32)
        v_lo = tl.load(vl + v_at).to(tl.float32)
        v = tl.reshape(vcodes * v_scale[:, :, None] + v_lo[:, :, None], [G, D])
        m, l, acc = _online_update(qkt, k, v, tok < G, m, l, acc, scale)
    if split == n_splits - 1:
        m, l, acc = _exact_block(qt, kr, vr, seq, n_res, cap_res, m, l, acc, scale, D)
        m, l, acc = _exact_block(qt, ksk, vsk, seq, n_sink, cap_sink, m, l, acc, scale, D)
        m, l, acc = _exact_block(qt, kn, vn, seq, 1, 1, m, l, acc, scale, D)  # the new token
    at = (seq * n_splits + split) * GQ_PAD + rows
    tl.store(part_m + at, m)
    tl.store(part_l + at, l)
    tl.store(part_acc + at[:, None] * D + ch[None, :], acc)


def decode_attention(q: torch.Tensor, store, k_new: torch.Tensor, v_new: torch.Tensor, scale: float,
                     tokens_per_split: int = 1024) -> torch.Tensor:
    """One decode step over a :class:`~fxpress.kv.stores.KIVIStore`: ``q [B, Hq, 1, d]``, the new
    ``k, v [B, Hkv, 1, d]`` -> float32 ``[B, Hq, 1, d]``. The quantised tokens are split among
    programs ``tokens_per_split`` (a multiple of the group size) at a time."""
    policy = store.policy
    g = policy.group_size
    b, hq, hkv, d, tokens_per_split = decode_step(q, k_new, g, tokens_per_split)
    splits = max(triton.cdiv(store.quantised, tokens_per_split), 1)
    gq, gq_pad = hq // hkv, _pad(hq // hkv)
    part_acc = torch.empty(b * hkv, splits, gq_pad, d, dtype=torch.float32, device=q.device)
    part_m = torch.empty(b * hkv, splits, gq_pad, dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    q = q.contiguous()
    q_keys, kd = q, d
    if store.pruner is not None and store.pruner.channels is not None:  # ThinK: the query's kept channels
        q_keys, kd = store.pruner.queries(q), store.pruner.kept
    rope = policy.rope_theta is not None
    # Without RoPE the kernel never reads cos and sin, but Triton wants a tensor for every pointer.
    cos, sin = rope_frame.cos_sin(policy.rope_theta, d, store.sunk + store.quantised, q.device) if rope else (q, q)
    _decode_kernel[(b * hkv, splits)](
        q, q_keys, store.k_codes, store.k_scale, store.k_lo, store.v_codes, store.v_scale, store.v_lo,
        store.k_residual, store.v_residual, store.k_sink, store.v_sink, k_new.contiguous(), v_new.contiguous(),
        part_acc, part_m, part_l, store.quantised, store.waiting, store.sunk, store.v_codes.shape[2],
        store.k_residual.shape[2], store.k_sink.shape[2], tokens_per_split, splits, scale, cos, sin,
        cos.shape[1] if rope else 0, GQ=gq, GQ_PAD=gq_pad, D=d, G=g, BITS=policy.bits,
        PW=quant.codes_per_word(policy.bits), KD=kd, KD_PAD=_pad(kd), ROPE=rope)
    # Combine the splits' partial softmaxes (a split with no tokens has max -inf and weight 0).
    top = part_m.amax(1, keepdim=True)
    weight = torch.exp(part_m - top)
    out = (part_acc * weight[..., None]).sum(1) / (part_l * weight).sum(1)[..., None]
    return out[:, :gq].reshape(b, hq, 1, d)
