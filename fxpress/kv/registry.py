"""KV policies are plug-ins: each policy type registers the function that builds its store for one
attention layer, and everything else (``fxpress.kv_cache``, the ``compress_kv_cache`` pass, option
checks, artifacts) asks this registry.

    @dataclass(frozen=True)
    class KeepLastKV:
        recent: int = 256
        def describe(self) -> str: return f"KeepLastKV({self.recent})"

    register_policy(KeepLastKV, lambda policy, layer, shape: streaming_store(0, policy.recent, shape.max_len,
                                                                             **shape.store_args()))

A store (``fxpress.kv.stores.Store``) brings its own attention when the reference does not fit it
(``Store.attend``): that is where a policy's kernels plug in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from fxpress.core.errors import OptionError
from fxpress.kv.stores import Store


class Policy(Protocol):
    """What every KV policy has: a frozen dataclass (hashable: compiled graphs key state by it) that
    describes itself. Quantising policies also have ``bits`` and ``group_size``."""

    def describe(self) -> str: ...


@dataclass(frozen=True)
class StoreShape:
    """The tensors one layer's store will hold: ``[batch, kv_heads, tokens, head_dim]`` of ``dtype``."""

    batch: int
    kv_heads: int
    head_dim: int
    max_len: int
    dtype: torch.dtype
    device: torch.device

    def store_args(self) -> dict[str, Any]:
        """The keywords every ``Store`` takes."""
        return dict(batch=self.batch, heads=self.kv_heads, head_dim=self.head_dim, dtype=self.dtype,
                    device=self.device)


StoreBuilder = Callable[[Any, int, StoreShape], Store]  # (policy, layer index, shape) -> store
_BUILDERS: dict[type, StoreBuilder] = {}


def register_policy(policy_type: type, build_store: StoreBuilder) -> type:
    """Make instances of ``policy_type`` usable as KV policies, their stores built by ``build_store``."""
    if not callable(getattr(policy_type, "describe", None)):
        raise TypeError(f"KV policy {policy_type.__name__} needs a describe() method")
    _BUILDERS[policy_type] = build_store
    return policy_type


def registered_policies() -> tuple[type, ...]:
    return tuple(_BUILDERS)


def is_policy(value: object) -> bool:
    return type(value) in _BUILDERS


def policy_class(name: str) -> type | None:
    """The registered policy type called ``name`` (an artifact records policies by class name)."""
    return next((cls for cls in _BUILDERS if cls.__name__ == name), None)


def check_policy(policy: object, where: str) -> Policy:
    if not is_policy(policy):
        names = ", ".join(cls.__name__ for cls in _BUILDERS)
        raise OptionError(f"{where}: expected a KV policy ({names}, or one registered with "
                          f"fxpress.kv.registry.register_policy), got {type(policy).__name__}")
    return policy


def make_store(policy: Policy, layer: int, *, batch: int, kv_heads: int, head_dim: int, max_len: int,
               dtype: torch.dtype, device: torch.device) -> Store:
    """The store ``policy`` keeps for attention layer ``layer``."""
    build = _BUILDERS[type(check_policy(policy, "fxpress KV cache"))]
    return build(policy, layer, StoreShape(batch, kv_heads, head_dim, max_len, dtype, device))
