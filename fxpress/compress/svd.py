"""``svd``: replace Linear layers by truncated-SVD factor pairs (optionally activation-aware).

Plain SVD keeps the top ``r`` singular triplets of ``W``: ``W ~ U_r S_r V_r^T``. Activation-aware
SVD (as in SVD-LLM / DRONE-style whitening) minimises the error of the layer's *outputs* on
calibration data instead: with ``G = X^T X = L L^T`` accumulated over calibration batches,
``||X (W - W')^T||_F = ||(W - W') L||_F``, so we truncate ``W L`` and map back with ``L^-1``.

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
from fxpress.compress.layer_records import record as record_layers
from fxpress.compress.linear_layers import matching_linears, set_submodule
from fxpress.compress.low_rank_linear import LowRankLinear
from fxpress.compress.sharded_linear import local_shard
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
        lines = [f"fxpress.compress.svd: {len(self.ranks)} of {len(self.layers)} Linear layers factored; "
                 f"parameters {self.params_before:,} -> {self.params_after:,} ({self.kept:.1%} kept; "
                 f"{self.targets_kept:.1%} of the targeted layers' weights)",
                 f"{'layer':<48} {'shape':>11} {'rank':>5} {'weight err':>10} {'output err':>10}"]
        for layer in self.layers:
            shape = f"{layer.in_features}x{layer.out_features}"
            if layer.rank is None:
                lines.append(f"{layer.name:<48} {shape:>11}   dense ({layer.skipped})")
                continue
            out_err = "-" if layer.output_error is None else f"{layer.output_error:.4f}"
            lines.append(f"{layer.name:<48} {shape:>11} {layer.rank:>5} {layer.weight_error:>10.4f} {out_err:>10}")
        return "\n".join(lines)


def svd(
    model: nn.Module,
    rank: int | Mapping[str, int] | None = None,
    rank_ratio: float | None = None,
    targets: str | Iterable[str] = "*",
    calibration: Iterable[Any] | None = None,
    params_kept: float | None = None,
) -> SVDResult:
    """Factor the ``nn.Linear`` layers (and transformers ``Conv1D``, GPT-2's) of ``model`` whose names
    match ``targets`` (glob patterns).

    Give exactly one of ``rank`` (an int for every layer, or ``{glob: rank}``; unmatched layers stay
    dense), ``rank_ratio`` (the fraction of each layer's parameters to keep: ``r = ratio *
    in*out / (in+out)``) and ``params_kept`` (the fraction of *all* the model's parameters to keep,
    embeddings and untargeted layers included: the targeted layers share the cut at one
    rank_ratio; ranks round down, so the model keeps at most that much). A layer whose rank would not save parameters stays dense and is reported.
    ``calibration`` is an iterable of model inputs (a tensor, a tuple of positional arguments or a
    dict of keyword arguments); with it the factorisation is activation-aware.
    """
    if sum(x is not None for x in (rank, rank_ratio, params_kept)) != 1:
        raise ValueError("fxpress.compress.svd: give exactly one of rank=, rank_ratio= and params_kept=")
    if rank_ratio is not None and not 0.0 < rank_ratio < 1.0:
        raise ValueError(f"fxpress.compress.svd: rank_ratio must be in (0, 1), got {rank_ratio}")
    patterns = [targets] if isinstance(targets, str) else list(targets)
    compressed = copy.deepcopy(model)
    linears = matching_linears(compressed, patterns)
    if not linears:
        raise ValueError(f"fxpress.compress.svd: no nn.Linear layer matches targets={patterns}")
    if params_kept is not None:
        rank_ratio = _ratio_keeping(model, linears, params_kept)
    grams = input_grams(compressed, linears, calibration, "fxpress.compress.svd") if calibration is not None else {}

    result = SVDResult(compressed, params_before=sum(p.numel() for p in model.parameters()))
    for name, layer in progress(linears.items(), "svd", total=len(linears)):
        linear, wrap = local_shard(layer, name)  # a tensor-parallel layer: this rank's shard
        r = _rank_for(name, linear, rank, rank_ratio)
        if isinstance(r, str):
            result.layers.append(LayerReport(name, linear.in_features, linear.out_features, None, None, None, r))
            continue
        low_rank, weight_error, output_error = factor(linear, r, grams.get(name))
        set_submodule(compressed, name, wrap(low_rank))
        result.layers.append(LayerReport(name, linear.in_features, linear.out_features, r,
                                         weight_error, output_error))
    result.params_after = sum(p.numel() for p in compressed.parameters())
    record_layers(compressed)
    return result


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
    if gram is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        down = s[:r, None].sqrt() * vh[:r]
    else:
        chol = _cholesky(gram.to(w.device))
        u, s, vh = torch.linalg.svd(w @ chol, full_matrices=False)
        down = torch.linalg.solve_triangular(chol, vh[:r], upper=False, left=False)  # vh_r L^-1
        down = s[:r, None].sqrt() * down
    up = u[:, :r] * s[:r].sqrt()
    approx = up @ down
    weight_error = float(torch.linalg.norm(w - approx) / torch.linalg.norm(w))
    output_error = None
    if gram is not None:
        output_error = float(torch.linalg.norm((w - approx) @ chol) / torch.linalg.norm(w @ chol))
    low_rank = LowRankLinear(linear.in_features, linear.out_features, r, bias=linear.bias is not None,
                             device=linear.weight.device, dtype=linear.weight.dtype)
    low_rank.down.weight.copy_(down)
    low_rank.up.weight.copy_(up)
    if linear.bias is not None:
        low_rank.up.bias.copy_(linear.bias)
    low_rank.train(linear.training)
    return low_rank, weight_error, output_error


def _cholesky(gram: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of the Gram matrix, damped until it is positive definite."""
    damp = 1e-6 * float(gram.diagonal().mean().clamp_min(1e-12))
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(gram + damp * eye)
        if int(info) == 0:
            return chol
        damp *= 10
    raise ValueError("fxpress.compress.svd: calibration activations are degenerate (Gram matrix not "
                     "positive definite even after damping); give more or more varied calibration data")
