"""``fxpress.calibrate_integer``: per-tensor input scales for the integer-only ops, measured on
sample inputs.

The model is captured exactly as a compile captures it, then each sample runs through the ATen
graph node by node, recording ``max |x|`` at the input of every site (for an attention decomposed
with ``sdpa=True``, of its scores; masked positions do not count; for a linear layer, of its
activation). A site's scale is that maximum
over all samples divided by 127 (``IntegerCalibration.scale``).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.fx as fx

from fxpress.compiler.capture import capture_and_compile
from fxpress.core.errors import IntegerError
from fxpress.core.model_inputs import call_with
from fxpress.core.progress import progress
from fxpress.integer.calibration import IntegerCalibration
from fxpress.integer.quantize import masked_positions
from fxpress.ir.integer_sites import find_sites
from fxpress.ir.match import sdpa_arguments


def _attention_scores(args: dict[str, Any]) -> torch.Tensor:
    q, k = args["query"], args["key"]
    scale = args.get("scale") or 1.0 / math.sqrt(q.shape[-1])
    scores = (q @ k.transpose(-2, -1)) * scale
    mask = args.get("attn_mask", args.get("attn_bias"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return scores


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, sites: dict[fx.Node, Any], ranges: dict[str, float]) -> None:
        super().__init__(gm)
        self.sites, self.ranges = sites, ranges

    def run_node(self, node: fx.Node) -> Any:
        site = self.sites.get(node)
        if site is not None:
            if site.kind == "sdpa":
                bound = sdpa_arguments(node)
                x = _attention_scores({k: self.env[v] if isinstance(v, fx.Node) else v for k, v in bound.items()})
            else:
                x = self.env[site.input]
            magnitude = x.detach().abs()
            if site.kind in ("softmax", "sdpa"):
                magnitude = magnitude.masked_fill(masked_positions(x), 0)
            top = float(magnitude.max()) if magnitude.numel() else 0.0
            self.ranges[site.key] = max(self.ranges.get(site.key, 0.0), top)
        return super().run_node(node)


def calibrate_integer(model: Any, samples: Iterable[Any], *, sdpa: bool = False) -> IntegerCalibration:
    """Record the input range of every softmax, GELU, LayerNorm and linear site (and, with ``sdpa=True``,
    every attention's scores) of ``model`` over ``samples``: each a dict of keyword arguments, a
    tuple of positional ones, or one tensor."""
    ranges: dict[str, float] = {}

    def backend(gm: fx.GraphModule, example_inputs: list[Any]) -> Any:
        def lower(captured: Any) -> Any:
            sites = {s.node: s for s in find_sites(captured.gm, sdpa)}
            runtime = captured.runtime_inputs

            def run(args: list[Any]) -> Any:
                inputs = [args[i] for i in runtime]
                args.clear()
                return _Recorder(captured.gm, sites, ranges).run(*inputs)
            run._boxed_call = True  # AOTAutograd then hands it the flat argument list
            return run
        return capture_and_compile(gm, example_inputs, lower)

    count = 0
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for sample in progress(samples, "calibrate_integer"):
            call_with(compiled, sample)
            count += 1
    torch._dynamo.reset()
    if count == 0:
        raise IntegerError("calibrate_integer needs at least one sample")
    if not ranges:
        raise IntegerError("calibrate_integer found no softmax, GELU or LayerNorm in the captured model"
                           + ("" if sdpa else " (attention through SDPA is seen only with sdpa=True)"))
    return IntegerCalibration(ranges, count)
