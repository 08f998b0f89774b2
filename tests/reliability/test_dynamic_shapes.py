"""Every value a kernel reads, tensor or size, is produced before it: a mixture-of-experts model
(whose routing sizes are SymInt nodes) at several sequence lengths equals eager."""

from __future__ import annotations

import torch
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

import fxpress


def _tiny_qwen2_moe():
    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                         shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128)
    return Qwen2MoeForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()


def test_qwen2_moe_at_several_lengths_equals_eager():
    model = _tiny_qwen2_moe()
    reports = []
    backend = fxpress.Backend(fxpress.Options(strict=True), on_report=reports.append)
    compiled = torch.compile(model, backend=backend)
    for length in (8, 13, 21):
        ids = torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            assert torch.allclose(compiled(ids).logits, model(ids).logits, atol=1e-5)
    assert len(reports) >= 2  # a static graph, then one with a symbolic length
