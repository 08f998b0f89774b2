"""Rotary embeddings for the low-rank attention tests, rotated by transformers' own code: Llama's
``rotate_half`` and Cohere's interleaved pairs are the truth the fused kernels must match."""

from __future__ import annotations

import torch
from transformers.models.cohere.modeling_cohere import apply_rotary_pos_emb as rotate_pairs
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as rotate_half


def tables(batch: int, seq: int, head_dim: int, interleaved: bool, generator: torch.Generator):
    """cos and sin [batch, seq, head_dim] as the models compute them from positions (a batch of
    different offsets, so a kernel that mixes up sequences fails); Cohere repeats each frequency
    for both members of a pair, Llama concatenates the two halves."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    offsets = torch.randint(0, 50, (batch, 1), generator=generator)
    angles = (torch.arange(seq) + offsets).float()[..., None] * inv_freq
    emb = angles.repeat_interleave(2, dim=-1) if interleaved else torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()


def rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool):
    """Q and K ([B, H, S, d]) rotated as the model family does it."""
    return (rotate_pairs if interleaved else rotate_half)(q, k, cos, sin)
