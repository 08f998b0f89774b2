"""The shared perplexity helper."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache

from fxpress.hf.perplexity import perplexity
from tests.tiny_models import VOCAB, tiny_llama, token_ids


def test_uniform_predictions_give_the_vocabulary_size():
    uniform = lambda ids, **_: SimpleNamespace(logits=torch.zeros(*ids.shape, 50))  # noqa: E731
    assert perplexity(uniform, torch.randint(0, 50, (2, 9))) == pytest.approx(50, rel=1e-6)


def test_a_cached_prefix_scores_like_one_forward():
    model, ids = tiny_llama().eval(), token_ids(batch=2, length=20)
    whole = perplexity(model, ids, prefix=12)
    cached = perplexity(model, ids, prefix=12, cache=DynamicCache(config=model.config))
    assert cached == pytest.approx(whole, rel=1e-5)
    assert 1 < whole < VOCAB * 10 and math.isfinite(perplexity(model, ids))


def test_prefill_context_wraps_only_the_prefix():
    model, ids = tiny_llama().eval(), token_ids(batch=1, length=10)
    calls = []

    class Prefill:
        def __enter__(self):
            calls.append("enter")

        def __exit__(self, *exc):
            calls.append("exit")

    perplexity(model, ids, prefix=6, cache=DynamicCache(config=model.config), prefill=Prefill())
    assert calls == ["enter", "exit"]
