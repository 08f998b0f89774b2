"""Which KV heads need every token: a training-free stand-in for DuoAttention's learned gates.

DuoAttention learns one gate per (layer, KV head) by distillation on synthetic passkey data; its
published patterns cover a few large models only. Without them, a head is scored by the attention
mass its queries put *outside* the sink and recent windows on calibration text: a streaming head
puts almost none there and loses little when those tokens go. The scores feed
``DuoAttentionKV.from_scores``.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def retrieval_head_scores(model: torch.nn.Module, input_ids: torch.Tensor, *, sink: int, recent: int
                          ) -> list[list[float]]:
    """``scores[layer][kv_head]``: mean attention mass outside the first ``sink`` and the last
    ``recent`` keys, over the queries that have such keys, summed over the head's query group."""
    config = model.config
    previous = config._attn_implementation
    model.set_attn_implementation("eager")  # the only implementation that returns probabilities
    try:
        attentions = model(input_ids, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(previous)
    t = input_ids.shape[1]
    if t <= sink + recent:
        raise ValueError(f"calibration text of {t} tokens is too short: scoring needs more than "
                         f"sink + recent = {sink + recent}")
    query = torch.arange(t)[:, None]
    key = torch.arange(t)[None, :]
    outside = (key >= sink) & (key < query - recent + 1)  # neither sink nor recent for this query
    rows = outside.any(-1)
    kv_heads = config.num_key_value_heads
    scores = []
    for probs in attentions:  # [B, Hq, T, T]
        mass = (probs.float() * outside).sum(-1)[:, :, rows].mean((0, 2))  # [Hq]
        scores.append(mass.view(kv_heads, -1).sum(-1).tolist())
    return scores
