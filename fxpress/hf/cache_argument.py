"""The keyword under which transformers models take their KV cache: ``cache`` in the releases that
renamed it (they warn that ``past_key_values`` is deprecated), ``past_key_values`` before.

    out = model.generate(ids, **cache_argument(cache), max_new_tokens=64)

Imports transformers on the first call.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any


@functools.cache
def cache_keyword() -> str:
    """``"cache"`` or ``"past_key_values"``, read from the installed transformers' Llama forward
    (the rename is library-wide: ``generate`` and every model take the same keyword)."""
    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def cache_argument(cache: Any) -> dict[str, Any]:
    """``{keyword: cache}`` for a model call or ``generate``, in this transformers' spelling."""
    return {cache_keyword(): cache}
