"""Every environment variable fxpress reads, declared once.

Nothing else in the package calls ``os.environ``. Passes never read flags: the backend resolves
them into :class:`fxpress.ir.options.Options` values before the pipeline runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Flag(Generic[T]):
    name: str
    default: T
    parse: Callable[[str], T]
    doc: str

    def get(self) -> T:
        raw = os.environ.get(self.name)
        if raw is None or raw == "":
            return self.default
        try:
            return self.parse(raw)
        except ValueError as e:
            raise ValueError(f"environment variable {self.name}={raw!r} is invalid: {e}") from None


def _level(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 4:
        raise ValueError("expected an integer from 0 to 4")
    return value


def _bool(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 0 or 1")


DEBUG = Flag(
    "FXPRESS_DEBUG", 0, _level,
    "Logging ladder: 1 one line per compiled graph; 2 also the graph after each pass that changed "
    "it; 3 also generated code; 4 also every rewrite-rule attempt and why it did not match.",
)
DUMP_DIR = Flag(
    "FXPRESS_DUMP_DIR", "", str,
    "Folder that receives, per compiled graph, the numbered graph after each pass "
    "(000_captured.txt, 001_<pass>.txt, ...) and the options used.",
)
CHECK = Flag(
    "FXPRESS_CHECK", False, _bool,
    "Lint the graph and re-derive every node's FakeTensor metadata after each pass; a pass that "
    "leaves a broken graph is named in the error.",
)

CACHE_DIR = Flag(
    "FXPRESS_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "fxpress"), str,
    "Where fxpress keeps converted real models (the fp32 copy of SmolLM2's GGUF), readable copies "
    "of generated wrappers and compiled C++ kernel libraries.",
)

CXX = Flag(
    "FXPRESS_CXX", "g++", str,
    "The C++ compiler target='cpp' builds its kernels with (a name on PATH or a path; g++ or "
    "clang++). When it is missing or fails, target='auto' runs the cpu target and explain() says why.",
)

TRITON_INTERPRET = Flag(
    "TRITON_INTERPRET", False, _bool,
    "Triton's own switch, read here too: with it, target='triton' runs its kernels in Triton's "
    "interpreter on CPU tensors (slow; for tests). Set it before triton is first imported.",
)

PROGRESS = Flag(
    "FXPRESS_PROGRESS", True, _bool,
    "Progress bars (tqdm, on standard error) for steps that can take more than a few seconds: "
    "quantising and factoring layers, calibration batches, ahead-of-time compiles, explain(). Shown only "
    "when standard error is a terminal; 0 turns them off there too.",
)

ALL_FLAGS: tuple[Flag, ...] = (DEBUG, DUMP_DIR, CHECK, CACHE_DIR, CXX, TRITON_INTERPRET, PROGRESS)
