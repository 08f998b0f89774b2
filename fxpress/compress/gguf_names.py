"""GGUF tensor names of a Llama-family model's Linear layers, mapped to the HF module names."""

from __future__ import annotations

from torch import nn

_LLAMA = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}


def hf_linear_names(model: nn.Module) -> dict[str, str]:
    """``blk.{i}.attn_q.weight`` -> ``model.layers.{i}.self_attn.q_proj`` for every layer of ``model``."""
    layers = len(model.model.layers)
    return {f"blk.{i}.{gguf}.weight": f"model.layers.{i}.{hf}" for i in range(layers) for gguf, hf in _LLAMA.items()}


def unpermute_rows(rows, heads: int):
    """Undo llama.cpp's row order for Q and K (it interleaves the two rotary halves of each head):
    ``rows`` is any tensor whose first dimension is the output rows."""
    half = rows.shape[0] // heads // 2
    return rows.reshape(heads, half, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)
