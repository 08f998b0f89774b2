"""Progress bars for the steps that can take more than a few seconds (tqdm, on standard error).

    for name, layer in progress(layers.items(), "quantize", total=len(layers)):
        ...

A bar shows only when standard error is a terminal and ``FXPRESS_PROGRESS`` is not 0; otherwise
the iterable comes back untouched, so logs and CI output stay clean.
"""

from __future__ import annotations

import sys
from typing import Iterable, TypeVar

from fxpress.core import flags

T = TypeVar("T")


def shown() -> bool:
    """Whether progress bars are drawn here and now."""
    return flags.PROGRESS.get() and sys.stderr.isatty()


def progress(items: Iterable[T], description: str, total: int | None = None) -> Iterable[T]:
    """``items``, behind a progress bar named ``description`` when bars are shown."""
    if not shown():
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=f"fxpress {description}", total=total, leave=False, file=sys.stderr, dynamic_ncols=True)


class StageBar:
    """A bar over named stages (``bar("export")``, ``bar("write")``, ..., ``bar.close()``): each call
    finishes the stage before it and names the new one."""

    def __init__(self, description: str, stages: int) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=stages, desc=f"fxpress {description}", leave=False, file=sys.stderr,
                         dynamic_ncols=True)
        self._started = False

    def __call__(self, stage: str) -> None:
        if self._started:
            self._bar.update(1)
        self._started = True
        self._bar.set_postfix_str(stage)

    def close(self) -> None:
        self._bar.close()


def stage_bar(description: str, stages: int) -> StageBar | None:
    """A ``StageBar`` when bars are shown, else None."""
    return StageBar(description, stages) if shown() else None
