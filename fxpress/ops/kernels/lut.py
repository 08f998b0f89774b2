"""Triton kernels of ``fxpress::lut_linear`` (LUT-GEMM / T-MAC) over bit-plane weights.

Few rows (decode): ``lut_tables_kernel`` builds, for every group of MU = 4 activations, the 16
signed sums ``T[p] = sum_j (2 bit_j(p) - 1) x_j``; ``lut_gemv_kernel`` then reads each weight
bit-plane 4 bits at a time as indices into those tables, sums the looked-up values over a quant
group and scales them by the group's ``alpha`` per bit (plus ``beta`` times the group's activation
sum). The weight is never expanded; K is split across programs so a single row fills the GPU.
Many rows (prefill): ``dequant_gemm_kernel`` expands one [BLOCK_N, group] weight tile at a time in
registers and multiplies it on the tensor cores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


MU = 4


@triton.jit
def lut_tables_kernel(x, tables, k_pad, BLOCK_C: tl.constexpr):
    row, block = tl.program_id(0), tl.program_id(1)
    chunks = block * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = chunks < k_pad // 4
    p = tl.arange(0, 16)
    t = tl.zeros([BLOCK_C, 16], tl.float32)
    for j in tl.static_range(4):  # entry p adds x_j when bit j of p is set, subtracts it otherwise
        xj = tl.load(x + row * k_pad + chunks * 4 + j, mask=ok, other=0.0).to(tl.float32)
        t += xj[:, None] * (((p[None, :] >> j) & 1) * 2 - 1).to(tl.float32)
    tl.store(tables + (row * (k_pad // 4) + chunks[:, None]) * 16 + p[None, :], t, mask=ok[:, None])


@triton.jit
def lut_gemv_kernel(tables, planes, alpha, beta, sums, bias, out, m, n, words, groups, k_pad, groups_per_split,
                    Q: tl.constexpr, WORDS_PER_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    """One activation row, BLOCK_N outputs, one split of the groups; writes ``out[split, row, cols]``."""
    row, block, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = cols < n
    in_group = tl.arange(0, WORDS_PER_GROUP)
    nibble = tl.arange(0, 8)
    table_row = tables + row * (k_pad // 4) * 16
    acc = tl.zeros([BLOCK_N], tl.float32)
    for step in range(groups_per_split):
        g = split * groups_per_split + step
        live = ok & (tl.zeros_like(cols) + g < groups)
        word = g * WORDS_PER_GROUP + in_group  # the group's words, loaded as one [BLOCK_N, words] tile
        chunk = word[None, :, None] * 8 + nibble[None, None, :]  # [1, words, 8]: each nibble's table
        for i in tl.static_range(Q):
            bits = tl.load(planes + (i * n + cols[:, None]) * words + word[None, :], mask=live[:, None], other=0)
            index = (bits[:, :, None] >> (nibble[None, None, :] * 4)) & 15
            looked_up = tl.load(table_row + chunk * 16 + index, mask=live[:, None, None], other=0.0)
            part = tl.sum(tl.sum(looked_up, axis=2), axis=1)
            acc += part * tl.load(alpha + (cols * groups + g) * Q + i, mask=live, other=0.0)
        # past the last group beta loads as 0, so any in-bounds sum will do
        group_sum = tl.load(sums + row * groups + tl.minimum(g, groups - 1))
        acc += tl.load(beta + cols * groups + g, mask=live, other=0.0) * group_sum
    if HAS_BIAS:
        acc += tl.load(bias + cols, mask=ok & (tl.zeros_like(cols) + split == 0), other=0.0).to(tl.float32)
    tl.store(out + (split * m + row) * n + cols, acc.to(out.dtype.element_ty), mask=ok)


@triton.jit
def dequant_gemm_kernel(x, planes, alpha, beta, bias, out, m, n, k, words, groups, WORDS_PER_GROUP: tl.constexpr,
                        Q: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    """One quant group per step: its [BLOCK_N, group] weight tile is expanded in registers from whole
    plane words and multiplied on the tensor cores in x's dtype (fp32 inputs: exact fp32 dot). K is
    not split: on an H100 the partial sums cost more than the idle SMs they would fill."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n
    GROUP: tl.constexpr = WORDS_PER_GROUP * 32
    in_group = tl.arange(0, WORDS_PER_GROUP)
    lane = tl.arange(0, 32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for g in range(groups):
        ks = g * GROUP + tl.arange(0, GROUP)
        xt = tl.load(x + rows[:, None] * k + ks[None, :], mask=(rows[:, None] < m) & (ks[None, :] < k), other=0.0)
        w = tl.zeros([BLOCK_N, WORDS_PER_GROUP, 32], tl.float32)
        for i in tl.static_range(Q):
            bits = tl.load(planes + (i * n + cols[:, None]) * words + g * WORDS_PER_GROUP + in_group[None, :],
                           mask=col_ok[:, None], other=0)
            sign = ((bits[:, :, None] >> lane[None, None, :]) & 1).to(tl.float32) * 2.0 - 1.0
            w += sign * tl.load(alpha + (cols * groups + g) * Q + i, mask=col_ok, other=0.0)[:, None, None]
        w += tl.load(beta + cols * groups + g, mask=col_ok, other=0.0)[:, None, None]
        tile = tl.trans(tl.reshape(w, [BLOCK_N, GROUP]))
        if IEEE:
            acc += tl.dot(xt.to(tl.float32), tile, input_precision="ieee")
        else:
            acc += tl.dot(xt, tile.to(xt.dtype))
    if HAS_BIAS:
        acc += tl.load(bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out + rows[:, None] * n + cols[None, :], acc.to(out.dtype.element_ty),
             mask=(rows[:, None] < m) & col_ok[None, :])


def _split_k(grid: tuple[int, int], groups: int, out2d: torch.Tensor) -> tuple[tuple[int, int, int], int, torch.Tensor]:
    """Split the groups (K) of a LUT GEMV until the launch has about 512 programs, a few per SM: one
    row would otherwise leave most of the GPU idle. Returns the grid, the groups per split and where they write:
    ``out2d`` itself when there is one, else float32 partial sums ``[splits, m, n]`` that are added
    afterwards (deterministic, unlike atomics)."""
    wanted = max(1, min(groups, triton.cdiv(512, grid[0] * grid[1])))
    per_split = triton.cdiv(groups, wanted)
    splits = triton.cdiv(groups, per_split)
    if splits == 1:
        return grid + (1,), per_split, out2d
    return grid + (splits,), per_split, torch.empty(splits, *out2d.shape, dtype=torch.float32, device=out2d.device)


def lut_linear(x: torch.Tensor, planes: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
               bias: torch.Tensor | None, in_features: int, group_size: int, max_lut_rows: int,
               out: torch.Tensor) -> torch.Tensor:
    q, n, words = planes.shape
    flat = x.reshape(-1, in_features)
    m = flat.shape[0]
    groups = words * 32 // group_size
    k_pad = words * 32
    out2d = out.view(m, n)
    planes, alpha, beta = planes.contiguous(), alpha.contiguous().float(), beta.contiguous().float()
    bias_arg = bias.contiguous() if bias is not None else beta
    if m == 0:
        return out
    if m <= max_lut_rows:
        padded = torch.nn.functional.pad(flat.float(), (0, k_pad - in_features)).contiguous()
        tables = torch.empty(m, k_pad // MU, 16, dtype=torch.float32, device=x.device)
        lut_tables_kernel[(m, triton.cdiv(k_pad // MU, 64))](padded, tables, k_pad, BLOCK_C=64)
        sums = padded.view(m, groups, group_size).sum(-1).contiguous()
        grid, per_split, partial = _split_k((m, triton.cdiv(n, 64)), groups, out2d)
        lut_gemv_kernel[grid](
            tables, planes, alpha, beta, sums, bias_arg, partial, m, n, words, groups, k_pad, per_split, Q=q,
            WORDS_PER_GROUP=group_size // 32, HAS_BIAS=bias is not None, BLOCK_N=64)
        if partial is not out2d:
            out2d.copy_(partial.sum(0))
    else:
        block_m = 16 if m <= 16 else 64
        block_n = 64 if triton.cdiv(m, block_m) * triton.cdiv(n, 64) >= 128 else 32  # narrower: more programs
        dequant_gemm_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
            flat.contiguous(), planes, alpha, beta, bias_arg, out2d, m, n, in_features, words, groups,
            WORDS_PER_GROUP=group_size // 32, Q=q, HAS_BIAS=bias is not None,
            IEEE=flat.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n)
    return out


