"""``svd``: replace Linear layers by truncated-SVD factor pairs (optionally activation-aware).

Plain SVD keeps the top ``r`` singular triplets of ``W``: ``W ~ U_r S_r V_r^T``. Activation-aware
SVD (SVD-LLM) minimises the error of the layer's *outputs* on calibration data instead
(``whitened_svd``). With calibration and a global budget (``params_kept``), each layer's rank is
chosen by the measured sensitivity of the model's output to it (``svd_ranks``).

The singular values are split evenly between the factors (``sqrt(S)`` on each side) so both
factors have comparable magnitudes, which keeps the fused kernels' accumulations well scaled.
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from fxpress.compress.calibration import input_grams
from fxpress.compress.distill import check_distillation, distill
from fxpress.compress.layer_records import record as record_layers
from fxpress.compress.linear_layers import matching_linears, set_submodule
from fxpress.compress.low_rank_linear import LowRankLinear
from fxpress.compress.sharded_linear import is_sharded, local_shard
from fxpress.compress.svd_ranks import measured_ranks
from fxpress.compress.whitened_svd import singular_triplets
from fxpress.core.progress import progress


@dataclass(frozen=True)
class LayerReport:
    name: str
    in_features: int
    out_features: int
    rank: int | None  # None: left dense
    weight_error: float | None  # ||W - W'||_F / ||W||_F
    output_error: float | None  # ||(W - W') L||_F / ||W L||_F, with calibration data only
    skipped: str | None = None  # why the layer stayed dense
    model_error: float | None = None  # measured allocation only: the model's output divergence with
    # this layer alone truncated (compress.svd_ranks)

    @property
    def params_before(self) -> int:
        return self.in_features * self.out_features

    @property
    def params_after(self) -> int:
        return self.params_before if self.rank is None else self.rank * (self.in_features + self.out_features)


@dataclass
class SVDResult:
    """The compressed model (a copy; the input model is untouched) and what was done to it."""

    model: nn.Module
    layers: list[LayerReport] = field(default_factory=list)
    params_before: int = 0  # every parameter of the model, factored or not
    params_after: int = 0
    distill_losses: list[float] = field(default_factory=list)  # each distillation epoch's mean loss

    @property
    def ranks(self) -> dict[str, int]:
        return {layer.name: layer.rank for layer in self.layers if layer.rank is not None}

    @property
    def kept(self) -> float:
        """Share of all the model's parameters kept (embeddings and dense layers included)."""
        return self.params_after / self.params_before

    @property
    def targets_kept(self) -> float:
        """Share of the targeted Linear layers' weights kept."""
        return sum(l.params_after for l in self.layers) / sum(l.params_before for l in self.layers)

    def __str__(self) -> str:
        measured = any(layer.model_error is not None for layer in self.layers)
        lines = [f"fxpress.compress.svd: {len(self.ranks)} of {len(self.layers)} Linear layers factored; "
                 f"parameters {self.params_before:,} -> {self.params_after:,} ({self.kept:.1%} kept; "
                 f"{self.targets_kept:.1%} of the targeted layers' weights)"
                 + ("; ranks allocated by measured sensitivity (model err: the model's output divergence "
                    "with that layer alone truncated)" if measured else ""),
                 f"{'layer':<48} {'shape':>11} {'rank':>5} {'weight err':>10} {'output err':>10}"
                 + (f" {'model err':>10}" if measured else "")]
        if self.distill_losses:
            lines.insert(1, f"factors then distilled for {len(self.distill_losses)} epochs: loss "
                            f"{self.distill_losses[0]:.4g} (first epoch) -> {self.distill_losses[-1]:.4g} (last)")
        for layer in self.layers:
            shape = f"{layer.in_features}x{layer.out_features}"
            if layer.rank is None:
                lines.append(f"{layer.name:<48} {shape:>11}   dense ({layer.skipped})")
                continue
            out_err = "-" if layer.output_error is None else f"{layer.output_error:.4f}"
            lines.append(f"{layer.name:<48} {shape:>11} {layer.rank:>5} {layer.weight_error:>10.4f} {out_err:>10}"
                         + (f" {layer.model_error:>10.2e}" if layer.model_error is not None else ""))
        return "\n".join(lines)


def svd(
    model: nn.Module,
    rank: int | Mapping[str, int] | None = None,
    rank_ratio: float | None = None,
    targets: str | Iterable[str] = "*",
    calibration: Iterable[Any] | None = None,
    params_kept: float | None = None,
    allocation: str | None = None,
    allocation_batches: int = 1,
    distill_epochs: int = 0,
    distill_lr: float = 1e-4,
    distill_batches: Iterable[Any] | None = None,
) -> SVDResult:
    """Factor the ``nn.Linear`` layers (and transformers ``Conv1D``, GPT-2's) of ``model`` whose names
    match ``targets`` (glob patterns).

    Give exactly one of ``rank`` (an int for every layer, or ``{glob: rank}``; unmatched layers stay
    dense), ``rank_ratio`` (the fraction of each layer's parameters to keep: ``r = ratio *
    in*out / (in+out)``) and ``params_kept`` (the fraction of *all* the model's parameters to keep,
    embeddings and untargeted layers included; ranks round down, so the model keeps at most that
    much). A layer whose rank would not save parameters stays dense and is reported.
    ``calibration`` is an iterable of model inputs (a tensor, a tuple of positional arguments or a
    dict of keyword arguments); with it the factorisation is activation-aware.

    ``allocation`` says how ``params_kept`` is shared: "measured" (the default with calibration)
    gives each layer the rank, or leaves it dense, by the measured sensitivity of the model's output
    to its truncation, on the first ``allocation_batches`` calibration batches (a forward pass of
    them per layer and candidate rank); "uniform" (the default without, and on a tensor-parallel
    model) cuts every layer at one ratio.

    ``distill_epochs``: after factoring, train the factors that many passes over the calibration
    batches (Adam from ``distill_lr``, decaying to zero) to reproduce the dense model's output
    (``compress.distill``): next-token logits by KL divergence, or every layer's hidden state
    (the last one alone where the model cannot return them). Costs a forward and backward pass
    of the model per batch and epoch; the report gives each epoch's loss. ``distill_batches``:
    train on these instead of the calibration batches: a larger corpus than whitening and
    allocation need (on MiniLM, whitening on its 38 distillation batches rather than the 4
    calibration ones held out 0.937 against 0.941 after 20 epochs,
    ``bench/results/fidelity-minilm-every-layer-cpu-2026-12-05.md``).
    """
    if sum(x is not None for x in (rank, rank_ratio, params_kept)) != 1:
        raise ValueError("fxpress.compress.svd: give exactly one of rank=, rank_ratio= and params_kept=")
    requested, allocation = allocation, _checked_allocation(allocation, params_kept, calibration, allocation_batches)
    distill_batches = None if distill_batches is None else list(distill_batches)
    check_distillation("fxpress.compress.svd", distill_epochs, distill_lr, calibration, distill_batches)
    if rank_ratio is not None and not 0.0 < rank_ratio < 1.0:
        raise ValueError(f"fxpress.compress.svd: rank_ratio must be in (0, 1), got {rank_ratio}")
    patterns = [targets] if isinstance(targets, str) else list(targets)
    compressed = copy.deepcopy(model)
    linears = matching_linears(compressed, patterns)
    if not linears:
        raise ValueError(f"fxpress.compress.svd: no nn.Linear layer matches targets={patterns}")
    if params_kept is not None:
        rank_ratio = _ratio_keeping(model, linears, params_kept)  # checks that the budget can be reached
    batches = list(calibration) if calibration is not None else None
    grams = input_grams(compressed, linears, batches, "fxpress.compress.svd") if batches is not None else {}
    allocated = None
    if allocation == "measured" and any(is_sharded(layer) for layer in linears.values()):
        if requested is None:
            allocation = "uniform"  # each rank would measure, and choose, differently
        else:
            raise ValueError("fxpress.compress.svd: allocation='measured' on a tensor-parallel model would choose "
                             "different ranks on each rank; pass allocation='uniform' or rank=")
    if distill_epochs and any(is_sharded(layer) for layer in linears.values()):
        raise ValueError("fxpress.compress.svd: distill_epochs on a tensor-parallel model would train each rank's "
                         "shard on its own; distil the unsharded model, then shard it")
    if allocation == "measured":
        total = sum(p.numel() for p in model.parameters())
        weights = sum(linear.weight.numel() for linear in linears.values())
        allocated = measured_ranks(compressed, linears, grams, batches[:allocation_batches],
                                   int(params_kept * total) - (total - weights))

    result = SVDResult(compressed, params_before=sum(p.numel() for p in model.parameters()))
    for name, layer in progress(linears.items(), "svd", total=len(linears)):
        linear, wrap = local_shard(layer, name)  # a tensor-parallel layer: this rank's shard
        r = _rank_for(name, linear, rank, rank_ratio) if allocated is None else allocated[name].rank
        sensitivity = None if allocated is None else allocated[name].error
        if r is None:
            r = "measured allocation kept it dense"
        if isinstance(r, str):
            result.layers.append(LayerReport(name, linear.in_features, linear.out_features, None, None, None, r,
                                             sensitivity))
            continue
        low_rank, weight_error, output_error = factor(linear, r, grams.get(name))
        set_submodule(compressed, name, wrap(low_rank))
        result.layers.append(LayerReport(name, linear.in_features, linear.out_features, r,
                                         weight_error, output_error, None, sensitivity))
    result.params_after = sum(p.numel() for p in compressed.parameters())
    if distill_epochs:
        trained_on = batches if distill_batches is None else distill_batches
        result.distill_losses = distill(compressed, model, trained_on, distill_epochs, distill_lr)
    record_layers(compressed)
    return result


def _checked_allocation(allocation: str | None, params_kept: float | None, calibration: Any,
                        allocation_batches: Any) -> str:
    if not isinstance(allocation_batches, int) or isinstance(allocation_batches, bool) or allocation_batches < 1:
        raise ValueError(f"fxpress.compress.svd: allocation_batches must be a positive int, got {allocation_batches!r}")
    if allocation is None:
        return "measured" if params_kept is not None and calibration is not None else "uniform"
    if allocation not in ("measured", "uniform"):
        raise ValueError(f"fxpress.compress.svd: allocation must be 'measured' or 'uniform', got {allocation!r}")
    if allocation == "measured" and (params_kept is None or calibration is None):
        raise ValueError("fxpress.compress.svd: allocation='measured' needs params_kept= (the budget to share) "
                         "and calibration= (the batches that measure each layer's sensitivity)")
    return allocation


def _ratio_keeping(model: nn.Module, linears: dict[str, nn.Linear], kept: float) -> float:
    """The rank_ratio at which the targeted layers' cut leaves ``kept`` of all the model's parameters."""
    total = sum(p.numel() for p in model.parameters())
    targeted = sum(linear.in_features * linear.out_features for linear in linears.values())
    ratio = 1 - (1 - kept) * total / targeted
    if not 0.0 < kept < 1.0 or not 0.0 < ratio < 1.0:
        raise ValueError(f"fxpress.compress.svd: params_kept={kept} cannot be reached by factoring the targeted "
                         f"layers: they hold {targeted / total:.1%} of the model's parameters")
    return ratio


def _rank_for(name: str, linear: nn.Linear, rank: Any, rank_ratio: float | None) -> int | str:
    """The rank for a layer, or why it stays dense."""
    n_in, n_out = linear.in_features, linear.out_features
    if rank_ratio is not None:
        r = int(rank_ratio * n_in * n_out / (n_in + n_out))
    elif isinstance(rank, Mapping):
        matches = [r for pattern, r in rank.items() if fnmatch.fnmatchcase(name, pattern)]
        if not matches:
            return "no rank given for it"
        r = matches[0]
    else:
        r = rank
    if not isinstance(r, int) or isinstance(r, bool) or r < 0:
        raise ValueError(f"fxpress.compress.svd: rank for {name} must be a positive int, got {r!r}")
    if r == 0:
        return "rank 0" if rank_ratio is None else f"rank_ratio {rank_ratio} leaves rank 0"
    if r * (n_in + n_out) >= n_in * n_out:
        return f"rank {r} would not save parameters"
    return r


@torch.no_grad()
def factor(linear: nn.Linear, r: int, gram: torch.Tensor | None) -> tuple[LowRankLinear, float, float | None]:
    """``linear`` as a rank-``r`` ``LowRankLinear`` (whitened by ``gram = X^T X`` when given), its
    relative weight error, and its relative output error on the Gram's inputs (with a Gram only)."""
    w = linear.weight.detach().to(torch.float64)
    u, s, rows, chol = singular_triplets(w, gram)
    down = s[:r, None].sqrt() * rows[:r]
    up = u[:, :r] * s[:r].sqrt()
    approx = up @ down
    weight_error = float(torch.linalg.norm(w - approx) / torch.linalg.norm(w))
    output_error = None
    if chol is not None:
        output_error = float(torch.linalg.norm((w - approx) @ chol) / torch.linalg.norm(w @ chol))
    low_rank = LowRankLinear(linear.in_features, linear.out_features, r, bias=linear.bias is not None,
                             device=linear.weight.device, dtype=linear.weight.dtype)
    low_rank.down.weight.copy_(down)
    low_rank.up.weight.copy_(up)
    if linear.bias is not None:
        low_rank.up.bias.copy_(linear.bias)
    low_rank.train(linear.training)
    return low_rank, weight_error, output_error
