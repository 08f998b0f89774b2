"""The low-rank ops on the cpp target: ``lowrank_linear`` and ``lowrank_ffn`` (``lowrank.cpp``: the
factored Linears run a tile of rows at a time, with bias, activation and gate applied to each
block before it is stored, so the FFN's wide hidden layer never exists beyond one tile per thread)
and ``lowrank_attention`` (``lowrank_attention.cpp``).

The kernel reads each factor re-laid out in panels of 16 output rows (``panels``), made once per
weight and kept while it lives unchanged, like the LUT kernel's layout. float32 only: the ops'
launcher refusal (``fxpress/ops/lowrank.py``) sends other dtypes to the reference.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from fxpress.native.kernels import FLOAT, INT, LONG, POINTER, library_beside, pointer, threads
from fxpress.native.layouts import DerivedLayouts

NR = 16  # output columns per panel (panel_gemm.h's NR)
# fxpress/native/, pasted in front of the kernel sources (full-width vectors for the epilogues' loops)
HEADERS = ("wide_vectors.h", "fast_math.h", "panel_gemm.h")
ATTENTION_HEADERS = HEADERS + ("attention_rows.h",)  # what the attention kernels share
ACTIVATION_CODES = {"gelu": 1, "gelu_tanh": 2, "silu": 3, "relu": 4}  # lowrank.cpp's Activation


@functools.cache
def _lib():
    return library_beside(__file__, "lowrank", {
        "fxpress_lowrank_linear": (None, [POINTER, LONG, LONG, LONG, POINTER, LONG, POINTER, LONG, POINTER,
                                          POINTER, LONG, INT]),
        "fxpress_lowrank_ffn": (None, [POINTER, LONG, LONG, LONG, POINTER, LONG, POINTER, LONG, POINTER,
                                       POINTER, LONG, POINTER, LONG, POINTER, POINTER, LONG, POINTER, POINTER,
                                       INT, POINTER, LONG, INT]),
    }, headers=HEADERS)


@functools.cache
def _attention_lib():
    factor = [POINTER, LONG, POINTER, POINTER]
    return library_beside(__file__, "lowrank_attention", {"fxpress_lowrank_attention": (
        None, factor * 3 + [LONG] * 6 + [POINTER, POINTER, INT, FLOAT, POINTER, POINTER, LONG, INT,
                                         POINTER, POINTER, FLOAT, POINTER, LONG, POINTER, POINTER, INT])},
        headers=ATTENTION_HEADERS)


def _panel_layout(weight: torch.Tensor) -> torch.Tensor:
    """``[n, k]`` -> ``[ceil(n / NR), k, NR]``: each panel's k rows of NR columns, zero past n."""
    return _head_panel_layout(weight, heads=1, columns=False)[0]


panels = DerivedLayouts(_panel_layout)


def _head_panel_layout(weight: torch.Tensor, heads: int, columns: bool) -> torch.Tensor:
    """Panels of each head's part: ``[heads * d, k]`` split by rows (an up factor), or ``[n, heads * d]``
    split by columns (o_down: head h's ``[n, d]``), as ``[heads, ceil(rows / NR), k, NR]``."""
    w = weight.detach()
    parts = w.view(w.shape[0], heads, -1).transpose(0, 1) if columns else w.view(heads, -1, w.shape[1])
    rows, k = parts.shape[1:]
    padded = torch.nn.functional.pad(parts, (0, 0, 0, -rows % NR))
    return padded.view(heads, -1, NR, k).transpose(2, 3).contiguous()


head_panels = DerivedLayouts(_head_panel_layout)


def _rows(x: torch.Tensor, out: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x as rows with unit column stride, and a contiguous result (``out`` itself when it can be)."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    result = out.view(-1, width) if out.is_contiguous() else torch.empty(flat.shape[0], width)
    return flat, result


def _finish(out: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    if result.data_ptr() != out.data_ptr():
        out.copy_(result.view(out.shape))
    return out


def lowrank_linear(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None,
                   out: torch.Tensor) -> torch.Tensor:
    n = up.shape[0]
    flat, result = _rows(x, out, n)
    down_p, up_p = panels(down), panels(up)  # held until the kernel returns
    _lib().fxpress_lowrank_linear(flat.data_ptr(), flat.stride(0), flat.shape[0], flat.shape[1],
                                  down_p.data_ptr(), down.shape[0], up_p.data_ptr(), n, pointer(bias),
                                  result.data_ptr(), n, threads())
    return _finish(out, result)


def lowrank_ffn(x: torch.Tensor, down1: torch.Tensor, up1: torch.Tensor, bias1: torch.Tensor | None,
                down2: torch.Tensor, up2: torch.Tensor, bias2: torch.Tensor | None, activation: str,
                gate_down: torch.Tensor | None, gate_up: torch.Tensor | None, gate_bias: torch.Tensor | None,
                out: torch.Tensor) -> torch.Tensor:
    n = up2.shape[0]
    flat, result = _rows(x, out, n)
    gated = gate_down is not None
    d1, u1, d2, u2 = panels(down1), panels(up1), panels(down2), panels(up2)  # held until the kernel returns
    gd, gu = (panels(gate_down), panels(gate_up)) if gated else (None, None)
    _lib().fxpress_lowrank_ffn(
        flat.data_ptr(), flat.stride(0), flat.shape[0], flat.shape[1],
        d1.data_ptr(), down1.shape[0], u1.data_ptr(), up1.shape[0], pointer(bias1),
        d2.data_ptr(), down2.shape[0], u2.data_ptr(), n, pointer(bias2),
        pointer(gd), gate_down.shape[0] if gated else 0, pointer(gu), pointer(gate_bias),
        ACTIVATION_CODES[activation], result.data_ptr(), n, threads())
    return _finish(out, result)


def _strides(values) -> ctypes.Array:
    return (ctypes.c_int64 * 4)(*values)


def additive_mask(attn_mask: torch.Tensor | None, shape: tuple[int, int, int, int]) -> torch.Tensor | None:
    """The mask as SDPA adds it (a boolean one: -inf where False), float32, broadcast to ``shape``."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape).masked_fill_(~attn_mask, float("-inf"))
    return attn_mask.to(torch.float32).expand(shape)


def _rotary_form(cos: torch.Tensor | None, interleaved: bool) -> int:
    """lowrank_attention.cpp's Rotary: none, rotate_half, or the interleaved pairs."""
    return 0 if cos is None else 2 if interleaved else 1


def lowrank_attention(pq: torch.Tensor, q_up: torch.Tensor, q_bias: torch.Tensor | None,
                      pk: torch.Tensor, k_up: torch.Tensor, k_bias: torch.Tensor | None,
                      pv: torch.Tensor, v_up: torch.Tensor, v_bias: torch.Tensor | None,
                      num_heads: int, num_kv_heads: int, attn_mask: torch.Tensor | None, is_causal: bool,
                      scale: float | None, o_down: torch.Tensor | None, cos: torch.Tensor | None,
                      sin: torch.Tensor | None, rotary_interleaved: bool, q_norm: torch.Tensor | None,
                      k_norm: torch.Tensor | None, norm_eps: float, out: torch.Tensor) -> torch.Tensor:
    pq, pk, pv = pq.contiguous(), pk.contiguous(), pv.contiguous()
    cos, sin = (None, None) if cos is None else (cos.contiguous(), sin.contiguous())
    (batch, seq, _), seq_k, d = pq.shape, pk.shape[1], q_up.shape[0] // num_heads
    mask = additive_mask(attn_mask, (batch, num_heads, seq, seq_k))
    result = out if o_down is None or out.is_contiguous() else torch.empty(out.shape)
    factors, layouts = [], []  # the layouts are held until the kernel returns
    for p, up, bias, heads in ((pq, q_up, q_bias, num_heads), (pk, k_up, k_bias, num_kv_heads),
                               (pv, v_up, v_bias, num_kv_heads)):
        layouts.append(head_panels(up, heads=heads, columns=False))
        factors += [p.data_ptr(), p.shape[-1], layouts[-1].data_ptr(), pointer(bias)]
    o_panels = None if o_down is None else head_panels(o_down, heads=num_heads, columns=True)
    _attention_lib().fxpress_lowrank_attention(
        *factors, batch, seq, seq_k, num_heads, num_kv_heads, d, pointer(mask),
        _strides(mask.stride() if mask is not None else (0, 0, 0, 0)), int(is_causal),
        d ** -0.5 if scale is None else scale, pointer(cos), pointer(sin),
        0 if cos is None or cos.shape[0] == 1 else cos.stride(0), _rotary_form(cos, rotary_interleaved),
        pointer(q_norm), pointer(k_norm), norm_eps,
        pointer(o_panels), 0 if o_down is None else o_down.shape[0],
        result.data_ptr(), _strides(result.stride() if o_down is None else (0, 0, 0, 0)), threads())
    return _finish(out, result)
