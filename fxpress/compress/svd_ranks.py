"""Per-layer ranks for a global parameter budget, chosen by measured sensitivity (ASVD style).

One ratio for every layer spends the budget badly: some layers' truncation barely moves the
model's output, others' ruins it, and a layer's own output error does not say which (measured on
SmolLM2 and MiniLM: allocating by each layer's whitened spectrum did worse than one ratio). So each
targeted layer is truncated alone, at each of a few fractions of its parameters, and the model's
output on calibration batches is compared with the dense model's: the mean KL divergence of the
next-token distributions when the model returns ``logits``, else the relative squared error of its
output. Treating these divergences as additive across layers, :func:`compress.allocate.allocate`
keeps the (rank, layer) steps that remove the most divergence per parameter within the budget.

Cost: one forward pass of the sensitivity batches per layer and fraction, plus one SVD per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from fxpress.compress.allocate import allocate
from fxpress.compress.divergence import divergence, model_output
from fxpress.compress.whitened_svd import singular_triplets
from fxpress.core.model_inputs import call_with
from fxpress.core.progress import progress

WHO = "fxpress.compress.svd"
FRACTIONS = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85)  # of a layer's parameters, the candidate ranks


@dataclass(frozen=True)
class RankOption:
    rank: int | None  # None: the layer stays dense
    params: int
    error: float  # the model's output divergence with only this layer truncated


def _params(option: RankOption) -> int:
    return option.params


@torch.no_grad()
def measured_ranks(model: nn.Module, linears: dict[str, nn.Linear], grams: dict[str, torch.Tensor],
                   batches: Sequence[Any], budget: int, fractions: Sequence[float] = FRACTIONS,
                   ) -> dict[str, RankOption]:
    """Each of ``linears``' rank (or dense) so that their weights total at most ``budget``
    parameters with the least summed divergence, measured on ``batches``; the truncations are
    whitened by ``grams``."""
    dense = [model_output(call_with(model, batch), WHO) for batch in batches]
    options: dict[str, list[RankOption]] = {}
    for name, linear in progress(linears.items(), "svd: sensitivity per layer", total=len(linears)):
        weight = linear.weight
        n_out, n_in = weight.shape
        found = [RankOption(None, n_out * n_in, 0.0)]
        u, s, rows, _ = singular_triplets(weight.detach().to(torch.float64), grams[name])
        kept = weight.detach().clone()
        ranks = sorted({int(f * n_out * n_in / (n_out + n_in)) for f in fractions} - {0})
        try:
            for r in ranks:
                weight.copy_((u[:, :r] * s[:r]) @ rows[:r])
                error = sum(divergence(model_output(call_with(model, batch), WHO), ref)
                            for batch, ref in zip(batches, dense))
                found.append(RankOption(r, r * (n_out + n_in), error / len(batches)))
        finally:
            weight.copy_(kept)
        options[name] = found
    chosen = allocate(options, budget, _params)
    if chosen is None:
        raise ValueError(f"fxpress.compress.svd: {budget:,} parameters cannot hold the targeted layers even at "
                         f"{min(fractions):.0%} of each layer's parameters")
    return chosen
