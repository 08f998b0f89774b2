"""The measured error of each integer-only rewrite, for explain().

The ``integer_only`` pass tags each rewritten site's float result with ``meta["integer_site"]``:
its name, kind, method, the float input node and the float op it replaced. Running the final graph
once more, node by node, gives at every site both the integer result and the float op applied to
the very same input, so each error is the site's own, not accumulated from the sites before it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx


def site_tag(key: str, kind: str, method: str, x: fx.Node, reference: Callable[[torch.Tensor], torch.Tensor],
             dequantise: tuple[fx.Node, Callable[[torch.Tensor], torch.Tensor]] | None = None) -> dict[str, Any]:
    """``x`` is the float input or, with ``dequantise = (node, fn)``, integer codes whose scale is
    ``fn(value of node)``."""
    return {"key": key, "kind": kind, "method": method, "x": x, "dequantise": dequantise, "reference": reference}


def _mutates(gm: fx.GraphModule) -> bool:
    for node in gm.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if schema is not None and any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
            return True
    return False


def has_sites(gm: fx.GraphModule) -> bool:
    return any("integer_site" in n.meta for n in gm.graph.nodes)


def measure_sites(gm: fx.GraphModule, inputs: list[Any]) -> list[dict[str, Any]]:
    """One row per site: max and mean |integer - float| and the float result's max |value|."""
    if _mutates(gm):
        return [{"key": "*", "note": "not measured: the graph updates its inputs in place"}]
    rows: list[dict[str, Any]] = []

    class _Measure(fx.Interpreter):
        def run_node(self, node: fx.Node) -> Any:
            result = value = super().run_node(node)
            tag = node.meta.get("integer_site")
            if tag is not None:
                if tag.get("result_scale") is not None:  # integer codes: read them as floats
                    scale_of, scale = tag["result_scale"]
                    result = result.to(torch.float32) * scale(self.env[scale_of]).to(torch.float32)
                x = self.env[tag["x"]]
                dtype = result.dtype
                if tag["dequantise"] is not None:
                    scale_of, scale = tag["dequantise"]
                    x = x.to(dtype) * scale(self.env[scale_of]).to(dtype)
                expected = tag["reference"](x).to(dtype)
                error = (result.double() - expected.double()).abs()
                rows.append({"key": tag["key"], "kind": tag["kind"], "method": tag["method"],
                             "max_abs_error": float(error.max()) if error.numel() else 0.0,
                             "mean_abs_error": float(error.mean()) if error.numel() else 0.0,
                             "max_abs_value": float(expected.abs().max()) if expected.numel() else 0.0})
            return value

    with torch.no_grad():
        _Measure(gm, garbage_collect_values=False).run(*inputs)  # a site reads its input after its last use
    return rows
