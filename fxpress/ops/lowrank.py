"""Low-rank ops: Linear layers stored as factor pairs, computed without their wide intermediates.

Factors are in ``nn.Linear`` layout, as ``fxpress.compress.LowRankLinear`` stores them:
``down: [rank, in]`` and ``up: [out, rank]``, contiguous, so ``linear(x) = x @ down.T @ up.T + bias``.

- ``lowrank_linear(x, down, up, bias)``: one factored Linear.
- ``lowrank_ffn(x, down1, up1, bias1, down2, up2, bias2, activation, gate_down, gate_up, gate_bias)``:
  ``act(L1(x)) -> L2``, or gated (SwiGLU) ``act(L_gate(x)) * L1(x) -> L2``; the D-wide activation
  never exists at full sequence length.
- ``lowrank_attention(pq, q_up, q_bias, pk, k_up, k_bias, pv, v_up, v_bias, ..., o_down, cos, sin,
  rotary_interleaved, q_norm, k_norm, norm_eps)``: attention over Q, K, V rebuilt from their rank-r factors ``p = x @ down.T``
  (FlashSVD's interface): the full-width Q, K and V never exist at once. With ``cos`` and ``sin``
  (the rotary embedding the model computed, [B|1, S, d]) the rebuilt Q and K heads are rotated
  before the scores, as Llama-family models do between their projections and SDPA; with
  ``q_norm`` and ``k_norm`` they are first RMS-normalised per head (Gemma 3, Qwen 3). The ``p``
  factors stay ordinary graph values because every query needs every key: rebuilding them per
  query tile from ``x`` would cost ``in/64`` times the attention. With ``o_down`` (the output projection's first factor) the op returns
  ``merge_heads(attention) @ o_down.T``, ``[B, S, rank_o]``, accumulated head by head, so the
  attention output never exists at full width either.

The cpp target runs all three in C++ (``fxpress/ops/cpp/lowrank.cpp`` and ``lowrank_attention.cpp``).
The references below are what the cpu target runs. They stream: the factored Linears and the FFN
go over blocks of rows, attention over one head and one block of queries at a time; each block's
widest temporary holds about ``BLOCK_ELEMENTS`` values, so their extra memory is a block's, not the
full-length intermediates. Results go straight into ``out`` (``addmm(..., out=)``), activations are
applied in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fxpress.core.triton_types import TL_DTYPES, dot_pad
from fxpress.ops._define import define_op
from fxpress.ops.lowering import Launcher, argument_name, tensor_arguments

MAX_RANK_PAD = 512  # widest on-chip rank accumulator a Triton program keeps (per row block)


def _triton(function: str) -> dict[str, Launcher]:
    """The op's Triton kernel (``fxpress/ops/kernels/lowrank.py``), for layouts and ranks it takes."""

    def refusal(node: torch.fx.Node) -> str | None:
        tensors = tensor_arguments(node)
        values = [a.meta["val"] for a in tensors] + [node.meta["val"]]
        if any(v.dtype not in TL_DTYPES for v in values):
            return f"{function} on a dtype outside {sorted(map(str, TL_DTYPES))}"
        if not node.args[0].meta["val"].is_contiguous():
            return f"{function} of a non-contiguous input"
        ranks = [v.shape[0] for a, v in zip(tensors, values) if "down" in argument_name(node, a)]
        ranks += [v.shape[-1] for a, v in zip(tensors, values) if argument_name(node, a).startswith("p")]
        # On CUDA the launcher runs the library order (ops/kernels/lowrank_library.py): any rank.
        wide = any(dot_pad(r) > MAX_RANK_PAD for r in ranks if not isinstance(r, torch.SymInt))
        if wide and not values[0].is_cuda:
            return f"{function} with a rank above {MAX_RANK_PAD} (its on-chip accumulator would spill)"
        return None
    return {"triton": Launcher("fxpress.ops.kernels.lowrank", function, refusal)}


def _cpp(function: str) -> dict[str, Launcher]:
    """The op's C++ kernel (``fxpress/ops/cpp/``), which computes in float32 (a mask may be boolean)."""

    def refusal(node: torch.fx.Node) -> str | None:
        dtypes = {a.meta["val"].dtype for a in tensor_arguments(node)
                  if not (argument_name(node, a) == "attn_mask" and a.meta["val"].dtype == torch.bool)}
        dtypes.add(node.meta["val"].dtype)
        if dtypes != {torch.float32}:
            return f"{function} on {sorted(map(str, dtypes))} (the cpp kernel is float32)"
        return None
    return {"cpp": Launcher("fxpress.ops.cpp.lowrank", function, refusal)}

BLOCK_ELEMENTS = 1 << 18  # widest temporary of one streamed block: 1 MiB in fp32
MIN_ROWS = 16  # blocks never shrink below this many rows (matmul efficiency)

ACTIVATIONS = {  # applied in place to a block's pre-activation
    "gelu": lambda t: torch.ops.aten.gelu_(t),
    "gelu_tanh": lambda t: torch.ops.aten.gelu_(t, approximate="tanh"),
    "silu": lambda t: F.silu(t, inplace=True),
    "relu": lambda t: F.relu(t, inplace=True),
}


def check_factors(op: str, x_features: int, down: torch.Tensor, up: torch.Tensor,
                  bias: torch.Tensor | None, what: str = "") -> None:
    """Raise a ValueError naming the op and the factor when a factor pair is malformed."""
    where = f"fxpress::{op}{f' ({what})' if what else ''}"
    if down.dim() != 2 or up.dim() != 2:
        raise ValueError(f"{where}: down and up must be 2-D, got {tuple(down.shape)} and {tuple(up.shape)}")
    if down.shape[0] == 0:
        raise ValueError(f"{where}: rank 0 factors ({tuple(down.shape)}) hold no information")
    if down.shape[1] != x_features:
        raise ValueError(f"{where}: down is {tuple(down.shape)} = [rank, in], but x has {x_features} features")
    if up.shape[1] != down.shape[0]:
        raise ValueError(f"{where}: up is {tuple(up.shape)} = [out, rank], but down has rank {down.shape[0]}")
    for name, t in (("down", down), ("up", up), ("bias", bias)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{where}: {name} must be contiguous, got strides {t.stride()} "
                             f"for shape {tuple(t.shape)}")
    if bias is not None and tuple(bias.shape) != (up.shape[0],):
        raise ValueError(f"{where}: bias is {tuple(bias.shape)}, expected ({up.shape[0]},)")
    dtypes = {down.dtype, up.dtype} | ({bias.dtype} if bias is not None else set())
    if len(dtypes) != 1:
        raise ValueError(f"{where}: factors have mixed dtypes {sorted(map(str, dtypes))}")


def _factored(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ down.T @ up.T + bias`` as ``nn.Linear`` twice computes it (``addmm`` with the bias)."""
    inner = x @ down.T
    if bias is None:
        return torch.mm(inner, up.T, out=out)
    return torch.addmm(bias, inner, up.T, out=out)


def _row_blocks(rows: int, width: int, elements: int | None = None):
    """Slices of at least MIN_ROWS rows whose ``width``-wide temporaries hold ~``elements`` values
    (BLOCK_ELEMENTS unless given)."""
    step = max(MIN_ROWS, (elements or BLOCK_ELEMENTS) // max(width, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


# lowrank_linear ---------------------------------------------------------------------------------

def _linear_into(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None,
                 *, out: torch.Tensor) -> None:
    _linear_checks(x, down, up, bias)
    flat, rows_out = x.reshape(-1, x.shape[-1]), out.view(-1, up.shape[0])
    for rows in _row_blocks(flat.shape[0], up.shape[0]):
        _factored(flat[rows], down, up, bias, out=rows_out[rows])


def _linear_reference(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    out = x.new_empty(*x.shape[:-1], up.shape[0])
    _linear_into(x, down, up, bias, out=out)
    return out


def _linear_checks(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None) -> None:
    check_factors("lowrank_linear", x.shape[-1], down, up, bias)
    if x.dtype != down.dtype:
        raise ValueError(f"fxpress::lowrank_linear: x is {x.dtype}, factors are {down.dtype}")


def _linear_fake(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    _linear_checks(x, down, up, bias)
    return x.new_empty(*x.shape[:-1], up.shape[0])


lowrank_linear = define_op("lowrank_linear", _linear_reference, _linear_fake, overwritable=0,
                           out_impl=_linear_into, lowerings=_triton("lowrank_linear") | _cpp("lowrank_linear"))


# lowrank_ffn ------------------------------------------------------------------------------------

def _ffn_checks(x, down1, up1, bias1, down2, up2, bias2, activation, gate_down, gate_up, gate_bias) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"fxpress::lowrank_ffn: activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
    check_factors("lowrank_ffn", x.shape[-1], down1, up1, bias1, "first projection")
    check_factors("lowrank_ffn", up1.shape[0], down2, up2, bias2, "second projection")
    if (gate_down is None) != (gate_up is None):
        raise ValueError("fxpress::lowrank_ffn: give both gate_down and gate_up, or neither")
    if gate_down is not None:
        check_factors("lowrank_ffn", x.shape[-1], gate_down, gate_up, gate_bias, "gate projection")
        if gate_up.shape[0] != up1.shape[0]:
            raise ValueError(f"fxpress::lowrank_ffn: gate width {gate_up.shape[0]} != up width {up1.shape[0]}")
    if x.dtype != down1.dtype or down2.dtype != down1.dtype:
        raise ValueError(f"fxpress::lowrank_ffn: x is {x.dtype}, factors are {down1.dtype} and {down2.dtype}")


def _ffn_into(x, down1, up1, bias1, down2, up2, bias2, activation, gate_down, gate_up, gate_bias,
              *, out: torch.Tensor) -> None:
    _ffn_checks(x, down1, up1, bias1, down2, up2, bias2, activation, gate_down, gate_up, gate_bias)
    ffn_over_row_blocks(x, down1, up1, bias1, down2, up2, bias2, activation, gate_down, gate_up, gate_bias, out,
                        BLOCK_ELEMENTS)


def ffn_over_row_blocks(x, down1, up1, bias1, down2, up2, bias2, activation, gate_down, gate_up, gate_bias,
                        out: torch.Tensor, elements: int) -> None:
    """The FFN (arguments already checked) over blocks of rows whose D-wide hidden layer holds about
    ``elements`` values: what the cpu target runs, and with larger blocks the GPU's library order."""
    act = ACTIVATIONS[activation]
    flat, rows_out = x.reshape(-1, x.shape[-1]), out.view(-1, up2.shape[0])
    for rows in _row_blocks(flat.shape[0], up1.shape[0], elements):
        block = flat[rows]
        hidden = _factored(block, down1, up1, bias1)
        if gate_down is None:
            act(hidden)
        else:
            hidden.mul_(act(_factored(block, gate_down, gate_up, gate_bias)))
        _factored(hidden, down2, up2, bias2, out=rows_out[rows])


def _ffn_reference(x: torch.Tensor, down1: torch.Tensor, up1: torch.Tensor, bias1: torch.Tensor | None,
                   down2: torch.Tensor, up2: torch.Tensor, bias2: torch.Tensor | None, activation: str,
                   gate_down: torch.Tensor | None, gate_up: torch.Tensor | None,
                   gate_bias: torch.Tensor | None) -> torch.Tensor:
    out = x.new_empty(*x.shape[:-1], up2.shape[0])
    _ffn_into(x, down1, up1, bias1, down2, up2, bias2, activation, gate_down, gate_up, gate_bias, out=out)
    return out


def _ffn_fake(x, down1, up1, bias1, down2, up2, bias2, activation, gate_down, gate_up, gate_bias):
    _ffn_checks(x, down1, up1, bias1, down2, up2, bias2, activation, gate_down, gate_up, gate_bias)
    return x.new_empty(*x.shape[:-1], up2.shape[0])


lowrank_ffn = define_op("lowrank_ffn", _ffn_reference, _ffn_fake, overwritable=0, out_impl=_ffn_into,
                        lowerings=_triton("lowrank_ffn") | _cpp("lowrank_ffn"))


# lowrank_attention ------------------------------------------------------------------------------

def _attention_checks(pq, q_up, q_bias, pk, k_up, k_bias, pv, v_up, v_bias, num_heads, num_kv_heads,
                      attn_mask, o_down, cos=None, sin=None, q_norm=None, k_norm=None) -> int:
    """Validate; return the head dimension."""
    where = "fxpress::lowrank_attention"
    for name, p, up, bias in (("q", pq, q_up, q_bias), ("k", pk, k_up, k_bias), ("v", pv, v_up, v_bias)):
        if p.dim() != 3:
            raise ValueError(f"{where}: p{name} must be [batch, seq, rank], got {tuple(p.shape)}")
        if up.dim() != 2 or up.shape[1] != p.shape[-1] or p.shape[-1] == 0:
            raise ValueError(f"{where}: {name}_up is {tuple(up.shape)} = [out, rank], p{name} has rank {p.shape[-1]}")
        if not up.is_contiguous() or (bias is not None and not bias.is_contiguous()):
            raise ValueError(f"{where}: {name}_up and {name}_bias must be contiguous")
        if bias is not None and tuple(bias.shape) != (up.shape[0],):
            raise ValueError(f"{where}: {name}_bias is {tuple(bias.shape)}, expected ({up.shape[0]},)")
    if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(f"{where}: num_heads={num_heads} must be a positive multiple of num_kv_heads={num_kv_heads}")
    if q_up.shape[0] % num_heads:
        raise ValueError(f"{where}: q width {q_up.shape[0]} is not divisible by {num_heads} heads")
    head_dim = q_up.shape[0] // num_heads
    if k_up.shape[0] != num_kv_heads * head_dim or v_up.shape[0] != num_kv_heads * head_dim:
        raise ValueError(f"{where}: k and v widths {k_up.shape[0]}, {v_up.shape[0]} != "
                         f"{num_kv_heads} kv heads x {head_dim}")
    if pk.shape[:2] != pv.shape[:2] or pq.shape[0] != pk.shape[0]:
        raise ValueError(f"{where}: pq {tuple(pq.shape)}, pk {tuple(pk.shape)} and pv {tuple(pv.shape)} disagree")
    if o_down is not None and (o_down.dim() != 2 or o_down.shape[1] != q_up.shape[0] or o_down.shape[0] == 0
                               or not o_down.is_contiguous()):
        raise ValueError(f"{where}: o_down must be a contiguous [rank, {q_up.shape[0]}] factor, got "
                         f"{tuple(o_down.shape)} with strides {o_down.stride()}")
    if attn_mask is not None and attn_mask.dim() != 4:
        raise ValueError(f"{where}: attn_mask must be 4-D [batch|1, heads|1, q, k], got {tuple(attn_mask.shape)}")
    _rotary_checks(where, pq, pk, head_dim, cos, sin)
    if (q_norm is None) != (k_norm is None):
        raise ValueError(f"{where}: give both q_norm and k_norm (per-head RMSNorm weights), or neither")
    for name, w in (("q_norm", q_norm), ("k_norm", k_norm)):
        if w is not None and (tuple(w.shape) != (head_dim,) or w.dtype != pq.dtype):
            raise ValueError(f"{where}: {name} must be a {pq.dtype} [head_dim] = [{head_dim}] weight, got "
                             f"{w.dtype} {tuple(w.shape)}")
    return head_dim


def _rotary_checks(where: str, pq: torch.Tensor, pk: torch.Tensor, head_dim: int,
                   cos: torch.Tensor | None, sin: torch.Tensor | None) -> None:
    if (cos is None) != (sin is None):
        raise ValueError(f"{where}: give both cos and sin for the rotary embedding, or neither")
    if cos is None:
        return
    expected = [(1, pq.shape[0]), (pq.shape[1],), (head_dim,)]
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or any(size not in allowed for size, allowed in zip(t.shape, expected)):
            raise ValueError(f"{where}: {name} must be [batch|1, seq, head_dim] = [{pq.shape[0]}|1, {pq.shape[1]}, "
                             f"{head_dim}], got {tuple(t.shape)}")
        if t.dtype != pq.dtype:
            raise ValueError(f"{where}: {name} is {t.dtype}, the factors are {pq.dtype}")
    if pk.shape[1] != pq.shape[1] or head_dim % 2:
        raise ValueError(f"{where}: a rotary embedding needs as many keys as queries (one position each) and an "
                         f"even head_dim, got {pq.shape[1]} queries, {pk.shape[1]} keys, head_dim {head_dim}")


def head_normed(t: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over each head's ``d`` channels (Gemma 3's and Qwen 3's q_norm and k_norm), with the
    model's weight (Gemma's ``1 + w`` already added in)."""
    if weight is None:
        return t
    return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotated(t: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, interleaved: bool) -> torch.Tensor:
    """``t * cos + rotate(t) * sin`` over the last dim, as the model computes it (``t``: [B, H, S, d];
    ``cos``, ``sin``: [B|1, S, d]). ``rotate`` is Llama's ``rotate_half`` (-x2, x1), or with
    ``interleaved`` the pairwise form of GPT-J and Cohere ((x0, x1) -> (-x1, x0))."""
    if cos is None:
        return t
    if interleaved:
        pairs = t.unflatten(-1, (-1, 2))
        turned = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    else:
        half = t.shape[-1] // 2
        turned = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
    return t * cos.unsqueeze(1) + turned * sin.unsqueeze(1)


def _attention_into(pq, q_up, q_bias, pk, k_up, k_bias, pv, v_up, v_bias, num_heads, num_kv_heads,
                    attn_mask, is_causal, scale, o_down, cos=None, sin=None, rotary_interleaved=False,
                    q_norm=None, k_norm=None, norm_eps=1e-6, *, out: torch.Tensor) -> None:
    """``out`` is [B, H, S, d] (any strides), or [B, S, rank_o] with ``o_down``."""
    d = _attention_checks(pq, q_up, q_bias, pk, k_up, k_bias, pv, v_up, v_bias, num_heads, num_kv_heads,
                          attn_mask, o_down, cos, sin, q_norm, k_norm)
    group = num_heads // num_kv_heads
    if o_down is not None:
        out.zero_()

    def head(p, up, bias, h):
        cols = slice(h * d, (h + 1) * d)
        return _factored_up(p, up[cols], None if bias is None else bias[cols]).unsqueeze(1)

    batch, seq, seq_k = pq.shape[0], pq.shape[1], pk.shape[1]
    for kv in range(num_kv_heads):
        k = rotated(head_normed(head(pk, k_up, k_bias, kv), k_norm, norm_eps), cos, sin, rotary_interleaved)
        v = head(pv, v_up, v_bias, kv)
        for h in range(kv * group, (kv + 1) * group):
            q = rotated(head_normed(head(pq, q_up, q_bias, h), q_norm, norm_eps), cos, sin, rotary_interleaved)
            # Query blocks keep the mask SDPA needs (a boolean becomes a float one) to a block's worth.
            for rows in _row_blocks(seq, batch * seq_k):
                mask = _block_mask(attn_mask, h, rows, seq_k, is_causal, q.dtype, q.device)
                context = F.scaled_dot_product_attention(q[:, :, rows], k, v, attn_mask=mask, scale=scale)[:, 0]
                if o_down is None:
                    out[:, h, rows] = context
                else:
                    out[:, rows] += context @ o_down[:, h * d:(h + 1) * d].T


def _block_mask(attn_mask: torch.Tensor | None, h: int, rows: slice, seq_k: int, is_causal: bool,
                dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """The additive mask of one head and block of queries (causality included), or None."""
    mask = None
    if attn_mask is not None:
        mask = attn_mask[:, h:h + 1] if attn_mask.shape[1] > 1 else attn_mask
        mask = mask[:, :, rows] if mask.shape[2] > 1 else mask
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, float("-inf"))
    if is_causal:
        queries = torch.arange(rows.start, rows.stop, device=device).unsqueeze(1)
        future = torch.arange(seq_k, device=device).unsqueeze(0) > queries  # SDPA's is_causal: top-left aligned
        causal = torch.zeros(future.shape, dtype=dtype, device=device).masked_fill_(future, float("-inf"))
        mask = causal if mask is None else mask + causal
    return mask


def _attention_reference(pq: torch.Tensor, q_up: torch.Tensor, q_bias: torch.Tensor | None,
                         pk: torch.Tensor, k_up: torch.Tensor, k_bias: torch.Tensor | None,
                         pv: torch.Tensor, v_up: torch.Tensor, v_bias: torch.Tensor | None,
                         num_heads: int, num_kv_heads: int, attn_mask: torch.Tensor | None,
                         is_causal: bool, scale: float | None, o_down: torch.Tensor | None,
                         cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                         rotary_interleaved: bool = False, q_norm: torch.Tensor | None = None,
                         k_norm: torch.Tensor | None = None, norm_eps: float = 1e-6) -> torch.Tensor:
    out = _attention_fake(pq, q_up, q_bias, pk, k_up, k_bias, pv, v_up, v_bias, num_heads, num_kv_heads,
                          attn_mask, is_causal, scale, o_down, cos, sin, rotary_interleaved, q_norm, k_norm, norm_eps)
    _attention_into(pq, q_up, q_bias, pk, k_up, k_bias, pv, v_up, v_bias, num_heads, num_kv_heads,
                    attn_mask, is_causal, scale, o_down, cos, sin, rotary_interleaved, q_norm, k_norm, norm_eps,
                    out=out)
    return out


def _factored_up(p: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = p @ up.T
    return y if bias is None else y + bias


def _attention_fake(pq, q_up, q_bias, pk, k_up, k_bias, pv, v_up, v_bias, num_heads, num_kv_heads,
                    attn_mask, is_causal, scale, o_down, cos=None, sin=None, rotary_interleaved=False,
                    q_norm=None, k_norm=None, norm_eps=1e-6):
    d = _attention_checks(pq, q_up, q_bias, pk, k_up, k_bias, pv, v_up, v_bias, num_heads, num_kv_heads,
                          attn_mask, o_down, cos, sin, q_norm, k_norm)
    if o_down is not None:
        return pq.new_empty(pq.shape[0], pq.shape[1], o_down.shape[0])
    return pq.new_empty(pq.shape[0], pq.shape[1], num_heads, d).permute(0, 2, 1, 3)


lowrank_attention = define_op("lowrank_attention", _attention_reference, _attention_fake,
                              out_impl=_attention_into, lowerings=_triton("lowrank_attention") | _cpp("lowrank_attention"))

