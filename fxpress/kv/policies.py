"""KV-cache policies: what a compressed cache keeps, and at which precision.

Each policy is a frozen dataclass validated when it is made, so a bad constant fails at the call
that wrote it, not deep inside a forward, and a plug-in: its file registers the function that
builds its store (``fxpress.kv.registry``). A new policy is one such file.

- ``FullKV``: every token at full precision (the exact reference).
- ``KIVI``: keys quantised per channel in groups of tokens, values per token, a full-precision
  residual window (Liu et al. 2024).
- ``StreamingKV``: the first ``sink`` tokens and the last ``recent`` ones (StreamingLLM).
- ``DuoAttentionKV``: every token for retrieval heads, sink + recent for the others; the head
  pattern is data.
- ``HeavyHitterKV``: a fixed budget of tokens per head, chosen by accumulated attention, the most
  recent ones protected (H2O / Scissorhands).
- ``ThinKV``: older keys keep only the channels the queries use most (ThinK); with ``kivi=``,
  those channels quantised KIVI's way.

The eviction policies compose with quantisation: ``bits=4`` stores the kept tokens as 4-bit codes,
quantised per token (a token can be evicted on its own, so its codes may not share a group with
other tokens).
"""

from fxpress.kv.duo_attention import DuoAttentionKV
from fxpress.kv.full import FullKV
from fxpress.kv.heavy_hitter import HeavyHitterKV
from fxpress.kv.kivi import KIVI
from fxpress.kv.policy_checks import check_head_dim
from fxpress.kv.registry import Policy, check_policy
from fxpress.kv.streaming import StreamingKV
from fxpress.kv.think import ThinKV

__all__ = ["KIVI", "DuoAttentionKV", "FullKV", "HeavyHitterKV", "Policy", "StreamingKV", "ThinKV", "check_head_dim",
           "check_policy"]
