"""What a target is: one way of running the kernels of a schedule.

Every target runs the same schedule and memory plan through one generated wrapper
(``fxpress.codegen.wrapper``); a target decides, kernel by kernel, whether it generates code for it.
A kernel it does not generate runs as torch calls into its planned slot (fxpress ops with their
reference implementations), which is always correct, so a target can start with nothing and
grow. A target is registered by name (``fxpress.codegen.targets.register_target``) and chosen
with ``fxpress.backend(target=name)``, or by ``target="auto"`` through its ``auto_rank``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from fxpress.codegen.schedule import Kernel


@dataclass(frozen=True)
class GeneratedKernel:
    """Code a target made for one scheduled kernel.

    ``source`` is module-level code the wrapper includes (a kernel definition; empty for a
    hand-written kernel it imports instead), ``imports`` the import lines it needs, and ``launch``
    the one statement in the wrapper's ``call`` that runs it, reading the buffers named by
    ``inputs`` and writing those named by ``outputs`` (node names; the wrapper allocates an output
    that has no planned slot before the launch)."""

    name: str
    source: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    launch: str
    imports: tuple[str, ...] = ()


class Target:
    """A target's interface; each method's default is that of a target generating nothing."""

    name: str = ""
    # Rank among the targets target="auto" may pick (None: never picked); the registry picks the
    # highest-ranked one that runs the graph's devices (``runs_devices``).
    auto_rank: int | None = None

    def runs_devices(self, devices: frozenset[str]) -> bool:
        """Whether this target runs a graph whose tensors live on ``devices`` (``{"cuda"}``...)."""
        return True

    def auto_refusal(self) -> str | None:
        """Why target="auto" may not pick this target here although it runs the graph's devices
        (a tool it needs is missing; shown in explain() when a lower-ranked target runs
        instead), or None when it may."""
        return None

    def check_graph(self, gm: fx.GraphModule) -> None:
        """Raise ``UnsupportedGraphError`` when this target cannot run ``gm`` at all (its devices)."""

    def device_refusal(self, device: torch.device) -> str | None:
        """Why a program compiled for this target cannot run on ``device`` here (a loaded artifact),
        or None when it can."""
        return None

    def prepare_graph(self, gm: fx.GraphModule) -> None:
        """Rewrite ``gm`` in place, before it is scheduled, into the form this target's kernels
        run best (an exact rewrite from ``fxpress.passes``; applying it twice changes nothing, as a
        loaded artifact's graph has had it already)."""

    def lower(self, kernel: Kernel, nodes: dict[str, fx.Node]) -> GeneratedKernel | str | None:
        """Code for ``kernel``; a string says why it runs as torch calls instead (shown in
        explain() and artifacts); None means this target never generates such kernels."""
        return None

    def preamble(self) -> tuple[str, ...]:
        """Import lines a wrapper with at least one of this target's kernels starts with."""
        return ()
