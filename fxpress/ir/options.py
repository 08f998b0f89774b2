"""The frozen options every compile is built from, validated when they are made; every pass reads them.

``fxpress.backend(target="cpu", passes=[my_pass])`` builds an :class:`Options`; so does
``torch.compile(model, backend="fxpress", options={...})``. An unknown name or a value of the wrong
type is refused at once with the list of valid options, never deep inside a compile. The target
name is checked against the registered targets when the backend is built
(``fxpress.codegen.targets.get_target``).
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from fxpress.core import flags
from fxpress.core.errors import OptionError
from fxpress.integer.config import IntegerOnly
from fxpress.kv.registry import is_policy


@dataclass(frozen=True)
class Pass:
    """A user pass and where it joins the pipeline.

    ``fn(gm, *, opts) -> torch.fx.passes.infra.pass_base.PassResult``. With neither ``before`` nor
    ``after`` it runs after every built-in pass; otherwise next to the named pass (a built-in one
    or another user pass).
    """

    fn: Callable[..., Any]
    before: str | None = None
    after: str | None = None

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise OptionError(f"fxpress.Pass needs a callable, got {type(self.fn).__name__}")
        if self.before is not None and self.after is not None:
            raise OptionError(f"fxpress.Pass({self.name}): give before= or after=, not both")
        try:
            inspect.signature(self.fn).bind(None, opts=None)
        except TypeError:
            raise OptionError(
                f"pass {self.name!r} must accept (gm, *, opts): got signature "
                f"{inspect.signature(self.fn)}"
            ) from None
        except ValueError:  # builtins without a signature: let the call decide
            pass

    @property
    def name(self) -> str:
        return getattr(self.fn, "__name__", type(self.fn).__name__)


def _is_pass_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(
        isinstance(p, Pass) or callable(p) for p in value
    )


def _is_name_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value)


# name -> (check, what a valid value is). One table, so the error can list every option.
_VALID: dict[str, tuple[Callable[[Any], bool], str]] = {
    "target": (lambda v: isinstance(v, str) and v != "",
               "the name of a registered target: 'cpu', 'triton', one of your own, or 'auto' "
               "(triton for graphs on CUDA, cpu otherwise)"),
    "strict": (lambda v: isinstance(v, bool), "bool: raise instead of falling back to eager"),
    "passes": (_is_pass_list, "list of pass functions or fxpress.Pass(fn, before=|after=)"),
    "disable": (_is_name_list, "list of pass names to skip"),
    "check": (lambda v: v is None or isinstance(v, bool), "bool: lint and verify after each pass"),
    "dump_dir": (lambda v: v is None or isinstance(v, str), "str: folder for per-pass graph dumps"),
    "kv": (lambda v: v is None or is_policy(v),
           "a registered KV policy (fxpress.KIVI(...), StreamingKV, DuoAttentionKV, HeavyHitterKV, FullKV) or None: "
           "compress KV caches kept in fixed buffers"),
    "lut_max_rows": (lambda v: v is None or isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                     "int >= 0 or None (by device: 4 on CPU, 0 on GPUs): lut_linear uses table lookup up to "
                     "this many rows, dequantise-per-tile GEMM above"),
    "integer": (lambda v: v is None or isinstance(v, IntegerOnly),
                "fxpress.IntegerOnly(...) or None: integer-only softmax, GELU and LayerNorm (I-BERT / I-ViT)"),
    "cuda_graphs": (lambda v: isinstance(v, bool),
                    "bool: replay each input layout of a CUDA graph as one CUDA graph (mode='reduce-overhead'); "
                    "results are copies, graphs that write their inputs or keep KV state run plainly"),
}


@dataclass(frozen=True)
class Options:
    target: str = "auto"
    strict: bool = False
    passes: tuple[Pass, ...] = ()
    disable: tuple[str, ...] = ()
    check: bool = field(default_factory=flags.CHECK.get)
    dump_dir: str = field(default_factory=flags.DUMP_DIR.get)
    kv: Any = None
    lut_max_rows: int | None = None
    integer: Any = None
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            check, valid = _VALID[f.name]
            if not check(value):
                raise OptionError(
                    f"fxpress option {f.name}={value!r} is invalid: expected {valid}.\n"
                    + describe_options()
                )
        # Normalise to hashable, immutable forms.
        object.__setattr__(
            self, "passes", tuple(p if isinstance(p, Pass) else Pass(p) for p in self.passes)
        )
        object.__setattr__(self, "disable", tuple(self.disable))
        if self.check is None:
            object.__setattr__(self, "check", flags.CHECK.get())
        if self.dump_dir is None:
            object.__setattr__(self, "dump_dir", flags.DUMP_DIR.get())

    @classmethod
    def create(cls, options: Mapping[str, Any] | None = None, **kwargs: Any) -> Options:
        """Options from a mapping and/or keywords; unknown names are refused by name."""
        merged = {**(options or {}), **kwargs}
        unknown = sorted(set(merged) - set(_VALID))
        if unknown:
            raise OptionError(f"unknown fxpress option(s) {unknown}.\n" + describe_options())
        return cls(**merged)


def describe_options() -> str:
    lines = ["Valid fxpress options:"]
    defaults = {f.name: f.default for f in dataclasses.fields(Options)}
    for name, (_, valid) in _VALID.items():
        default = defaults[name]
        shown = "from env" if default is dataclasses.MISSING else repr(default)
        lines.append(f"  {name:<9} {valid} (default {shown})")
    return "\n".join(lines)
