"""``fxpress.fit``'s sensitivities: what each layer's compression costs the whole model.

A layer's relative output error does not say how far it moves the model's output: the token
embedding feeds the first layer and, tied, the logits; a late MLP's error reaches the logits
almost unchanged; an early one's is partly washed out. On SmolLM2, weighing options by their own
output errors put the embedding at 3 bits at a 25 % budget and lost to storing everything at 4
(``bench/results/fit-cpu-2026-12-05.md``). So each layer is swapped alone for one probe option and
the model's divergence from the dense model is measured (``compress.divergence``); every option of
the layer then weighs its output error times that layer's divergence per unit of output error.
One forward pass per layer, against one per option measured directly.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import torch

from fxpress.compress.divergence import divergence, model_output
from fxpress.compress.linear_layers import set_submodule
from fxpress.core.model_inputs import call_with
from fxpress.core.progress import progress
from fxpress.hf.fit_embedding import install

WHO = "fxpress.fit"
PROBE_BITS = (3, 4, 2, 8)  # the probe option of a layer: the first of these among its options


@torch.no_grad()
def weigh_by_model_divergence(measured: Any, batches: Sequence[Any]) -> None:
    """Each layer of ``measured`` (a ``fit.Measured``; not imported, as fit imports this module)
    alone at its probe option: the model's output divergence on ``batches``. Then every option of
    the layer weighs its output error times (divergence / the probe's output error)."""
    work, (table, head) = measured.model, measured.embedding or (None, None)
    dense = [model_output(call_with(work, batch), WHO) for batch in batches]
    for name, options in progress(measured.options.items(), "fit: sensitivity per layer",
                                  total=len(measured.options)):
        probe = next((o for b in PROBE_BITS for o in options if o.kind == "bits" and o.value == b), None)
        if probe is None or probe.output_error <= 0:
            continue
        kept = work.get_submodule(name), work.get_submodule(head) if name == table and head else None
        try:
            made = measured.made[(name, probe.kind, probe.value)]
            if name == table:
                install(work, table, head, made)
            else:
                set_submodule(work, name, made)
            found = sum(divergence(model_output(call_with(work, batch), WHO), ref)
                        for batch, ref in zip(batches, dense)) / len(batches)
        finally:
            set_submodule(work, name, kept[0])
            if kept[1] is not None:
                set_submodule(work, head, kept[1])
        measured.sensitivity[name] = found
        per_error = found / probe.output_error
        measured.options[name] = [replace(o, error=o.output_error * per_error) for o in options]

