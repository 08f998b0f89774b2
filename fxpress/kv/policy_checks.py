"""What every KV policy checks when it is made, so a bad constant fails at the call that wrote it:
the shared validators, and the head-size check a cache makes against the model."""

from __future__ import annotations

from fxpress.core.errors import KVCacheError, OptionError

QUANT_BITS = (2, 4, 8)


def require(ok: bool, policy: str, message: str) -> None:
    if not ok:
        raise OptionError(f"fxpress.{policy}: {message}")


def check_positive(policy: str, **values: int) -> None:
    for name, value in values.items():
        require(is_int(value) and value > 0,
                policy, f"{name} must be a positive int, got {value!r}")


def check_sink(policy: str, sink: int) -> None:
    require(is_int(sink) and sink >= 0, policy,
            f"sink must be an int >= 0, got {sink!r}")


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_bits(policy: str, bits: int | None, group_size: int) -> None:
    if bits is not None:
        require(is_int(bits) and bits in QUANT_BITS, policy,
                f"bits must be one of {QUANT_BITS} or None, got {bits!r}")
    check_positive(policy, group_size=group_size)


def describe_bits(bits: int | None) -> str:
    """The tail of an evicting policy's ``describe()`` saying how its kept tokens are stored."""
    return "" if bits is None else f" + {bits}-bit"


def check_head_dim(policy: object, head_dim: int, where: str) -> None:
    """Refuse, when a cache is made, a policy that cannot quantise heads of ``head_dim`` channels:
    quantised values are grouped over ``group_size`` channels."""
    bits, group = getattr(policy, "bits", None), getattr(policy, "group_size", None)
    if bits is not None and head_dim % group:
        divisors = [g for g in (8, 16, 32, 64, 128) if head_dim % g == 0 and g % (32 // bits) == 0]
        raise KVCacheError(f"{where}: {policy.describe()} quantises values in groups of group_size={group} "
                           f"channels, which head_dim {head_dim} is not a multiple of; use group_size in "
                           f"{divisors or [head_dim]}")
