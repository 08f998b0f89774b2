"""Calling a model on one sample as calibration APIs take them: a tensor (one positional
argument), a tuple or list (positional arguments) or a mapping (keyword arguments)."""

from __future__ import annotations

from typing import Any, Callable, Mapping


def call_with(model: Callable[..., Any], sample: Any) -> Any:
    if isinstance(sample, Mapping):
        return model(**sample)
    if isinstance(sample, (tuple, list)):
        return model(*sample)
    return model(sample)
