"""The exceptions fxpress raises; each message says what was wrong, where, and what to do."""

from __future__ import annotations


class FxpressError(RuntimeError):
    """Base class of every error fxpress raises on purpose."""


class OptionError(FxpressError, ValueError):
    """An option given to ``fxpress.backend``/``explain`` is unknown or of the wrong type."""


class PassError(FxpressError):
    """A pass raised, or left the graph broken; the message names the pass and those before it."""


class UnsupportedGraphError(FxpressError):
    """The graph holds something fxpress cannot compile (raised under ``strict=True``;
    otherwise the graph runs eagerly with a warning)."""


class KVCacheError(FxpressError, ValueError):
    """A compressed KV cache was used beyond what it was built for (too long, padded, out of order)."""


class IntegerError(FxpressError, ValueError):
    """An integer-only parameter, scale or input is out of the range its int32 arithmetic holds."""
