"""How an fxpress op is made: a torch.library schema, a fake kernel (its shape rule), a reference
implementation, and per target the kernel that runs it (``fxpress.ops.lowering``).

The reference implementation, in plain torch, is the definition of correct for the op and the
kernel the cpu target runs. The fake kernel computes output metadata (shape, dtype, strides) with no
data, so passes can put the op into graphs carrying FakeTensors and symbolic shapes. A new op is
one file calling :func:`define_op` (imported by ``fxpress/ops/__init__.py``) plus its tests.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from fxpress.ops.lowering import Launcher

NAMESPACE = "fxpress"


@dataclass(frozen=True)
class OpSpec:
    name: str
    op: torch._ops.OpOverload
    reference: Callable[..., Any]
    fake: Callable[..., Any]
    # Index of the argument the output may overwrite in place (the planner's choice): the op is
    # row-local in it, every kernel of the op reading a whole row before writing that row.
    overwritable: int | None = None
    # The reference writing into a given ``out=`` tensor (same arguments, then ``out``): what the
    # cpu target calls so the result lands in its planned slot with no full-size temporary.
    out_impl: Callable[..., None] | None = None
    # Index of an int argument naming state the op keeps across calls (kv_attend's KV state):
    # generated wrappers pass it through their ``KV_HANDLES`` table, so a loaded artifact can
    # point it at state of its own process.
    state_handle: int | None = None
    # Target name -> the kernel that target runs the op with; a target not named runs the reference.
    lowerings: Mapping[str, Launcher] = dataclasses.field(default_factory=dict, compare=False)

    @property
    def qualname(self) -> str:
        return f"{NAMESPACE}::{self.name}"


# Every fxpress op by name; codegen and the runtime look kernels up here.
OPS: dict[str, OpSpec] = {}


def op_spec(target: Any) -> OpSpec | None:
    """The spec of an fxpress op overload; None for any other call target."""
    if getattr(target, "namespace", "") != NAMESPACE:
        return None
    return OPS.get(target._schema.name.split("::")[1])


def define_op(
    name: str,
    reference: Callable[..., Any],
    fake: Callable[..., Any],
    *,
    mutates_args: tuple[str, ...] = (),
    overwritable: int | None = None,
    out_impl: Callable[..., None] | None = None,
    state_handle: int | None = None,
    lowerings: Mapping[str, Launcher] | None = None,
) -> torch._ops.OpOverload:
    """Register ``fxpress::<name>``; the schema is inferred from ``reference``'s type hints."""
    if name in OPS:
        raise RuntimeError(f"fxpress op {name!r} is defined twice")
    custom = torch.library.custom_op(f"{NAMESPACE}::{name}", reference, mutates_args=mutates_args)
    custom.register_fake(fake)
    overload = getattr(getattr(torch.ops, NAMESPACE), name).default
    OPS[name] = OpSpec(name, overload, reference, fake, overwritable, out_impl, state_handle,
                       dict(lowerings or {}))
    return overload
