"""The cpu target: every kernel runs as torch calls into its planned slot, fxpress ops with their
reference implementations (``OpSpec.out_impl``), row reductions in row blocks
(``fxpress.codegen.row_blocked``). It generates no code, so it runs wherever torch does."""

from __future__ import annotations

from fxpress.codegen.targets.base import Target


class CpuTarget(Target):
    name = "cpu"
    auto_rank = 0  # runs anything: what target="auto" falls back to
