"""Per-tensor input scales for the integer-only ops: what ``fxpress.calibrate_integer`` measures
(``fxpress/compiler/calibrate.py``) and ``IntegerOnly(calibration=...)`` reads.

    calibration = fxpress.calibrate_integer(model, [tokenizer(text, return_tensors="pt") for text in texts])
    compiled = torch.compile(model, backend=fxpress.backend(integer=fxpress.IntegerOnly(calibration=calibration)))

The model is captured exactly as a compile captures it, then each sample runs through the ATen
graph node by node, recording ``max |x|`` at the input of every site (for an attention decomposed
with ``sdpa=True``, of its scores; masked positions do not count). A site's scale is that maximum
over all samples divided by 127, the symmetric per-tensor scale of I-BERT and I-ViT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

from fxpress.core.errors import IntegerError


@dataclass(frozen=True)
class IntegerCalibration:
    """``ranges``: site name -> the largest ``|x|`` seen at its input over ``samples`` samples."""

    ranges: Mapping[str, float] = field(default_factory=dict)
    samples: int = 0

    def __post_init__(self) -> None:
        for key, value in self.ranges.items():
            if not (isinstance(value, float) and math.isfinite(value) and value >= 0):
                raise IntegerError(f"calibration range of {key!r} is {value!r}; expected a finite float >= 0")

    def scale(self, key: str, bits: int = 8) -> float | None:
        """The per-tensor scale of site ``key`` for ``bits``-bit codes (None when it was never seen)."""
        top = self.ranges.get(key)
        if top is None:
            return None
        return top / ((1 << (bits - 1)) - 1) if top > 0 else 1.0
