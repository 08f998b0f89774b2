"""Perplexity of a causal language model on a token sequence: the one loop benchmarks, examples
and tests share.

    ppl = perplexity(model, ids)                                   # every token from those before it
    ppl = perplexity(model, ids, prefix=1024, cache=kv_cache(...))  # the tokens after a cached prefix
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch

from fxpress.hf.cache_argument import cache_argument


@torch.no_grad()
def scored_logits(model: Any, ids: torch.Tensor, prefix: int = 0, cache: Any = None,
                  prefill: ContextManager | None = None) -> torch.Tensor:
    """The float32 logits ``[batch, n, vocab]`` that predict ``ids[:, start:]``, ``start = max(prefix, 1)``.

    Without ``cache``: one forward over ``ids``. With one: the first ``prefix`` tokens go through
    the cache first (inside ``prefill``, a context manager such as a kvpress press), then the scored
    tokens in one call that reads what the cache kept: how a compressed cache is measured.
    """
    if cache is None or prefix == 0:
        logits = model(ids, **({} if cache is None else cache_argument(cache))).logits
        return logits[:, max(prefix, 1) - 1:-1].float()
    with prefill if prefill is not None else contextlib.nullcontext():
        first = model(ids[:, :prefix], **cache_argument(cache), logits_to_keep=1).logits[:, -1:]
    positions = torch.arange(prefix, ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
    rest = model(ids[:, prefix:], **cache_argument(cache), position_ids=positions).logits[:, :-1]
    return torch.cat([first, rest], 1).float()


def perplexity_of(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """``exp`` of the mean cross-entropy of ``targets [batch, n]`` under ``logits [batch, n, vocab]``."""
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()).exp())


def perplexity(model: Any, ids: torch.Tensor, prefix: int = 0, cache: Any = None,
               prefill: ContextManager | None = None) -> float:
    """``exp`` of the mean cross-entropy of ``ids[:, max(prefix, 1):]`` (see ``scored_logits``)."""
    return perplexity_of(scored_logits(model, ids, prefix, cache, prefill), ids[:, max(prefix, 1):])
