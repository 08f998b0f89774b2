"""Write your own pass and put it into the fxpress pipeline.

A pass is a plain function ``(gm, *, opts) -> PassResult``. It reads node metadata
(``node.meta["val"]`` holds a FakeTensor), edits the graph, and bumps named counters instead of
printing. This one rewrites ``gelu(x, approximate="none")`` to the tanh approximation, an
approximate rewrite, so the script also measures its error against eager.

Run: ``python examples/custom_pass.py``
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

import fxpress
from fxpress import workloads


def gelu_to_tanh(gm: fx.GraphModule, *, opts: fxpress.Options) -> PassResult:
    """gelu(x) => gelu(x, approximate="tanh"): cheaper on some targets, error ~1e-3."""
    changed = 0
    for node in gm.graph.nodes:
        if node.target is torch.ops.aten.gelu.default and node.kwargs.get("approximate", "none") == "none":
            node.kwargs = {**node.kwargs, "approximate": "tanh"}
            fxpress.counters["gelu_to_tanh"]["gelu(x) => gelu(x, tanh)"] += 1
            changed += 1
    gm.recompile()
    return PassResult(gm, changed > 0)


def main() -> None:
    model, tokenizer = workloads.load_minilm()
    batch = tokenizer(["A man is eating food.", "A man is eating a piece of bread."],
                      padding=True, return_tensors="pt")

    # Run it after CSE, before the rms_norm fusion; or omit before=/after= to run it last.
    backend = fxpress.backend(passes=[fxpress.Pass(gelu_to_tanh, after="cse")])
    report = fxpress.explain(model, kwargs=dict(batch), passes=[fxpress.Pass(gelu_to_tanh, after="cse")])
    (record,) = [p for p in report.graphs[0].passes if p.name == "gelu_to_tanh"]
    print(f"gelu_to_tanh fired {record.counters['gelu_to_tanh']} in {record.seconds * 1e3:.1f} ms")

    with torch.no_grad():
        eager = model(**batch).last_hidden_state
        ours = torch.compile(model, backend=backend)(**batch).last_hidden_state
    print(f"max |approximate - eager| on MiniLM hidden states: {(ours - eager).abs().max().item():.3g}")


if __name__ == "__main__":
    main()
