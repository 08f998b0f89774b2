"""How a target runs an fxpress op with a kernel of its own: a :class:`Launcher`, declared beside
the op's reference in its file (``lowerings={"triton": Launcher(...)}``).

A target that generates code for the op (``fxpress.codegen.targets``) looks the launcher up by its
own name, asks ``refusal`` whether this node's metadata suits the kernel, and if so emits
``function(<the op's arguments>, out)`` into the wrapper, importing ``function`` from ``module``.
Launchers read sizes at run time, so symbolic shapes need nothing here. A node the launcher
refuses, and every op on a target without a launcher, runs its reference (``OpSpec.out_impl`` or
``reference``), so an op is correct on every target from the moment it is defined.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from fxpress.core.triton_types import TL_DTYPES


@dataclass(frozen=True)
class Launcher:
    module: str  # imported by generated wrappers only (kernel modules import triton)
    function: str
    # Why this node cannot take the kernel (its layout, dtype or sizes), or None when it can.
    refusal: Callable[[fx.Node], str | None] | None = None

    def refuses(self, node: fx.Node) -> str | None:
        return None if self.refusal is None else self.refusal(node)


def static(value: Any) -> bool:
    """A tensor whose sizes and strides are all known at compile time."""
    return isinstance(value, torch.Tensor) and not any(
        isinstance(s, torch.SymInt) for s in (*value.shape, *value.stride()))


def contiguous(value: Any) -> bool:
    return static(value) and value.is_contiguous()


def tensor_arguments(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]


def rows_of(t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """``t`` contiguous, its number of rows and its row width (the last dim): what row kernels take."""
    t = t.contiguous()
    width = t.shape[-1]
    return t, t.numel() // max(width, 1), width


def argument_name(node: fx.Node, arg: fx.Node) -> str:
    """The schema name of the argument ``arg`` fills in ``node``."""
    schema = node.target._schema
    return next((a.name for a, value in zip(schema.arguments, node.args) if value is arg), "")


def float_input_refusal(function: str) -> Callable[[fx.Node], str | None]:
    """The kernels that read integer codes or one float input of a Triton dtype (integer-only, LUT)."""

    def refusal(node: fx.Node) -> str | None:
        x = node.args[0].meta["val"]
        if x.is_floating_point() and x.dtype not in TL_DTYPES:
            return f"{function} of {x.dtype}"
        return None
    return refusal
