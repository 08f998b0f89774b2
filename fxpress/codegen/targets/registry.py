"""Targets by name: ``fxpress.backend(target=name)``, artifacts' ``meta.json``, and ``"auto"``."""

from __future__ import annotations

from fxpress.codegen.targets.base import Target
from fxpress.core.errors import OptionError

_TARGETS: dict[str, Target] = {}


def register_target(target: Target) -> Target:
    """Make ``target`` available by its name; a name is registered once."""
    if not target.name or target.name == "auto":
        raise ValueError(f"a target needs a name other than 'auto', got {target.name!r}")
    if target.name in _TARGETS:
        raise ValueError(f"a target named {target.name!r} is already registered")
    _TARGETS[target.name] = target
    return target


def unregister_target(name: str) -> None:
    _TARGETS.pop(name, None)


def target_names() -> tuple[str, ...]:
    return ("auto", *_TARGETS)


def get_target(name: str) -> Target:
    """The target registered as ``name``; ``"auto"``: the first registered one that offers itself."""
    if name == "auto":
        return next(t for t in _TARGETS.values() if t.auto)
    target = _TARGETS.get(name)
    if target is None:
        valid = ", ".join(repr(n) for n in target_names())
        raise OptionError(f"fxpress option target={name!r} is invalid: expected one of {valid} "
                          "(targets registered with fxpress.codegen.targets.register_target)")
    return target
