"""``fxpress.fit``: compress a causal language model to a byte budget, choosing per layer.

    result = fxpress.fit(model, budget_bytes=120e6, calibration=batches, kv_tokens=4096)
    print(result)                                     # the plan: a row per layer, bytes and error
    cache = fxpress.kv_cache(result.model, 4096, result.kv)
    compiled = torch.compile(result.model, backend="fxpress")

What counts is what a deployment holds: every parameter the fit leaves dense at 2 bytes (fp16),
each quantised layer's bit-planes and scales, each factored layer's two factors at 2 bytes a
parameter, and the KV state one sequence of ``kv_tokens`` tokens takes under the chosen policy
(every byte its stores allocate).

How it chooses:

1. Each targeted Linear's input Gram ``X^T X`` is measured once on the calibration batches, and
   each option (dense; ``bits`` by round-to-nearest or BCQ; a whitened SVD at each ``rank_ratio``)
   is made once and scored by its relative output error ``||(W' - W) X^T||^2 / ||W X^T||^2``.
   The token embedding (and a tied output layer) is an option too: dense, or at one of ``bits``
   (``fit_embedding``). A layer's output error does not say what it costs the model (the
   embedding feeds the first layer and, tied, the logits), so each layer is then swapped alone for
   one probe option (3 bits) and the model's output divergence from the dense model is measured on
   the first calibration batch (``compress.divergence``: KL of the next-token distributions); every
   option of that layer weighs its output error times that layer's divergence per unit of output
   error.
2. For each candidate KV policy, the bytes left after the dense parts and the KV state go to the
   layers greedily: every layer starts at its smallest option, and the upgrade that removes the
   most error per byte is taken while it fits (on each layer's lower convex hull of bytes and error).
3. Each candidate's model is assembled and run on the calibration tokens (concatenated, at most
   ``kv_tokens``): the first three quarters go through its compressed cache, the last quarter is
   scored. The candidate with the lowest perplexity is the plan.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

import fxpress.lowbit as lowbit
from fxpress.compress.allocate import allocate
from fxpress.compress.calibration import input_grams
from fxpress.compress.layer_records import record as record_layers
from fxpress.compress.linear_layers import matching_linears, set_submodule
from fxpress.compress.quantized_linear import QuantizedLinear
from fxpress.compress.svd import factor
from fxpress.core.errors import OptionError
from fxpress.core.progress import progress
from fxpress.hf.fit_embedding import embedding_options, find_embedding, install
from fxpress.hf.fit_sensitivity import weigh_by_model_divergence
from fxpress.hf.kv_cache import kv_cache
from fxpress.hf.perplexity import perplexity
from fxpress.kv import KIVI, FullKV, StreamingKV, ThinKV
from fxpress.kv.registry import check_policy, make_store

BITS = (8, 4, 3, 2)
RANK_RATIOS = (0.5, 0.25)
FP16 = 2  # bytes a dense parameter takes in the deployment the budget describes


@dataclass(frozen=True)
class Option:
    """One way to store a layer: ``kind`` "dense", "bits" (``value`` bits) or "rank" (``value`` the rank)."""

    kind: str
    value: int | None
    nbytes: int
    output_error: float  # the layer's relative output error on the calibration inputs (squared)
    # What the allocation weighs: the model's output divergence this option is estimated to cause
    # (``Measured.sensitivity``), or the output error when that was not measured.
    error: float

    def describe(self) -> str:
        return {"dense": "dense fp16", "bits": f"{self.value}-bit", "rank": f"rank {self.value}"}[self.kind]


@dataclass
class FitResult:
    """The fitted model, its KV policy, the option chosen per layer, and what the other KV
    candidates scored."""

    model: nn.Module
    kv: Any
    plan: dict[str, Option]
    shapes: dict[str, tuple[int, int]]
    budget_bytes: int
    fixed_bytes: int  # the parameters no option touches (embeddings, norms, skipped layers), fp16
    kv_bytes: int
    calibration_perplexity: float
    candidates: list[dict[str, Any]] = field(default_factory=list)  # per KV policy tried
    weighed_by_model: bool = False  # whether the options' errors are measured model divergences

    @property
    def weight_bytes(self) -> int:
        return self.fixed_bytes + sum(o.nbytes for o in self.plan.values())

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes

    def __str__(self) -> str:
        mib = 2 ** 20
        lines = [f"fxpress.fit: {self.total_bytes / mib:.1f} MiB of {self.budget_bytes / mib:.1f} MiB "
                 f"(weights {self.weight_bytes / mib:.1f}, of which untouched {self.fixed_bytes / mib:.1f}; "
                 f"KV {self.kv_bytes / mib:.1f} under {self.kv.describe()}); calibration perplexity "
                 f"{self.calibration_perplexity:.3f}",
                 f"{'layer':<44} {'shape':>11} {'stored as':>12} {'MiB':>8} {'output err':>10} {'model div':>10}"]
        for name, option in self.plan.items():
            shape = "x".join(map(str, self.shapes[name]))
            lines.append(f"{name:<44} {shape:>11} {option.describe():>12} {option.nbytes / mib:8.3f} "
                         f"{math.sqrt(option.output_error):10.4f} "
                         f"{f'{option.error:.2e}' if self.weighed_by_model else '-':>10}")
        lines.append("KV policies tried:")
        for c in self.candidates:
            outcome = f"perplexity {c['perplexity']:.3f}" if "perplexity" in c else c["refused"]
            lines.append(f"  {c['policy']:<60} KV {c['kv_bytes'] / mib:7.1f} MiB  {outcome}")
        return "\n".join(lines)


def default_kv_policies(kv_tokens: int) -> list[Any]:
    """From exact to small: full, KIVI-4, KIVI-2, ThinK + KIVI-2, and windows of half and a quarter
    of the tokens (their kept tokens as 4-bit codes)."""
    return [FullKV(), KIVI(bits=4), KIVI(bits=2), ThinKV(ratio=0.5, kivi=KIVI(bits=2)),
            StreamingKV(sink=4, recent=max(kv_tokens // 2 - 4, 1), bits=4),
            StreamingKV(sink=4, recent=max(kv_tokens // 4 - 4, 1), bits=4)]


def kv_bytes(model: nn.Module, policy: Any, kv_tokens: int) -> int:
    """Bytes one sequence of ``kv_tokens`` tokens holds under ``policy`` (fp16 storage), every layer."""
    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return sum(make_store(policy, layer, batch=1, kv_heads=heads, head_dim=head_dim, max_len=kv_tokens,
                          dtype=torch.float16, device=torch.device("meta")).nbytes()
               for layer in range(config.num_hidden_layers))


@dataclass
class Measured:
    """Every targeted layer's options, made and scored once: reusable for several budgets."""

    model: nn.Module  # fxpress.fit's own copy of the model, every targeted layer dense
    layers: dict[str, nn.Linear]
    options: dict[str, list[Option]]
    made: dict[tuple[str, str, int], nn.Module]
    fixed_bytes: int
    ids: torch.Tensor  # [1, <= kv_tokens] calibration tokens that judge a KV policy
    kv_tokens: int
    embedding: tuple[str, str | None] | None = None  # the embedding's name and its tied output layer's,
    # when the embedding is one of the options
    # Per layer, the model's output divergence with that layer alone at its probe option (empty when
    # not measured: options then weigh their output errors).
    sensitivity: dict[str, float] = field(default_factory=dict)

    def shapes(self) -> dict[str, tuple[int, int]]:
        shapes = {name: (layer.in_features, layer.out_features) for name, layer in self.layers.items()}
        if self.embedding is not None:
            table = self.model.get_submodule(self.embedding[0]).weight
            shapes[self.embedding[0]] = (table.shape[1], table.shape[0])
        return shapes


def measure(model: nn.Module, calibration: Iterable[Any], kv_tokens: int, *, targets: str | Iterable[str] = "*",
            skip: Iterable[str] = ("lm_head",), bits: Sequence[int] = BITS,
            rank_ratios: Sequence[float] = RANK_RATIOS, group_size: int = 128, method: str = "rtn",
            embedding: bool = True, sensitivity_batches: int = 1) -> Measured:
    """Step 1 of :func:`fit` (its arguments): each targeted layer's options and their errors."""
    batches = list(calibration)
    if not isinstance(sensitivity_batches, int) or isinstance(sensitivity_batches, bool) or sensitivity_batches < 0:
        raise OptionError(f"fxpress.fit: sensitivity_batches must be an int >= 0, got {sensitivity_batches!r}")
    if method not in ("rtn", "bcq"):
        raise OptionError(f"fxpress.fit: method={method!r} is not 'rtn' or 'bcq'")
    for b in bits:
        lowbit.check_format(b, group_size)
    work = copy.deepcopy(model)
    layers = matching_linears(work, [targets] if isinstance(targets, str) else list(targets), list(skip))
    if not layers:
        raise OptionError(f"fxpress.fit: no nn.Linear layer matches targets={targets!r} outside skip={list(skip)}")
    table, head = find_embedding(work) if embedding else (None, None)
    heads = {} if head is None else {head: work.get_submodule(head)}
    grams = input_grams(work, {**layers, **heads}, batches, "fxpress.fit")
    options, made = _options(layers, grams, bits, rank_ratios, group_size, method)
    fixed = FP16 * (sum(p.numel() for p in work.parameters())
                    - sum(p.numel() for layer in layers.values() for p in layer.parameters()))
    if table is not None:
        module = work.get_submodule(table)
        tokens = torch.cat([_ids(b).reshape(-1) for b in batches])
        counts = torch.bincount(tokens, minlength=module.num_embeddings)
        found = [Option("dense", None, FP16 * module.weight.numel(), 0.0, 0.0)]
        for b, nbytes, error, quantized in embedding_options(module, grams.get(head), counts, bits, group_size,
                                                             method):
            made[(table, "bits", b)] = quantized
            found.append(Option("bits", b, nbytes, error, error))
        options[table] = found
        fixed -= FP16 * module.weight.numel()
    ids = torch.cat([_ids(b)[:1] for b in batches], 1)[:, :kv_tokens]
    measured = Measured(work, layers, options, made, fixed, ids, kv_tokens, None if table is None else (table, head))
    if sensitivity_batches > 0:
        weigh_by_model_divergence(measured, batches[:sensitivity_batches])
    return measured


def fit(model: nn.Module, budget_bytes: float, calibration: Iterable[Any], kv_tokens: int, *,
        targets: str | Iterable[str] = "*", skip: Iterable[str] = ("lm_head",), bits: Sequence[int] = BITS,
        rank_ratios: Sequence[float] = RANK_RATIOS, group_size: int = 128, method: str = "rtn",
        kv_policies: Sequence[Any] | None = None, measured: Measured | None = None,
        embedding: bool = True, sensitivity_batches: int = 1) -> FitResult:
    """A copy of causal LM ``model`` whose Linear layers matching ``targets`` (and not ``skip``) are
    each stored dense, at one of ``bits`` (``method``: "rtn", or "bcq" weighted by the calibration
    inputs, slower) or at one of ``rank_ratios`` (activation-aware SVD), with one of
    ``kv_policies``, so that weights plus the KV state at ``kv_tokens`` fit ``budget_bytes`` with the
    least measured error (module docstring). ``calibration``: model inputs as ``compress.svd``
    takes them, token ids under ``input_ids``. ``embedding``: whether the token embedding (with a
    tied output layer) may be stored at one of ``bits`` too (``fit_embedding``).
    ``sensitivity_batches``: how many calibration batches measure each layer's effect on the model's
    output (0: weigh each layer's own output error instead; module docstring). ``measured``:
    :func:`measure`'s result for this model, to skip step 1 (then the options' arguments are not used)."""
    if measured is None:
        measured = measure(model, calibration, kv_tokens, targets=targets, skip=skip, bits=bits,
                           rank_ratios=rank_ratios, group_size=group_size, method=method, embedding=embedding,
                           sensitivity_batches=sensitivity_batches)
    return best_plan(measured, budget_bytes, lambda weight_budget: allocate(measured.options, weight_budget, _nbytes),
                     kv_policies)


def best_plan(measured: Measured, budget_bytes: float, planner: Callable[[int], dict[str, Option] | None],
              kv_policies: Sequence[Any] | None = None) -> FitResult:
    """Steps 2 and 3 of :func:`fit` for any ``planner``: given the bytes left for the targeted
    layers, their options (or None when it cannot fit them). A benchmark's uniform choices go
    through the same KV choice as the fit."""
    policies = [check_policy(p, "fxpress.fit") for p in (kv_policies or default_kv_policies(measured.kv_tokens))]
    candidates, best = [], None
    for policy in progress(policies, "fit: KV policies"):
        try:
            held = kv_bytes(measured.model, policy, measured.kv_tokens)
        except ValueError as e:  # the policy cannot hold this model's heads (KVCacheError is one too)
            candidates.append({"policy": policy.describe(), "kv_bytes": 0, "refused": str(e)})
            continue
        plan = planner(int(budget_bytes) - measured.fixed_bytes - held)
        if plan is None:
            candidates.append({"policy": policy.describe(), "kv_bytes": held,
                               "refused": "the smallest option of every layer does not fit beside it"})
            continue
        fitted = _assemble(measured, plan)
        ids = measured.ids
        ppl = perplexity(fitted, ids, ids.shape[1] * 3 // 4, kv_cache(fitted, ids.shape[1], policy))
        candidates.append({"policy": policy.describe(), "kv_bytes": held, "perplexity": ppl})
        if best is None or ppl < best[0]:
            best = (ppl, policy, plan, fitted, held)
    if best is None:
        smallest = measured.fixed_bytes + sum(min(o.nbytes for o in opts) for opts in measured.options.values())
        tried = "; ".join(f"{c['policy']}: {c.get('refused')} ({c['kv_bytes']} bytes)" for c in candidates)
        raise OptionError(f"fxpress.fit: budget_bytes={int(budget_bytes)} fits no plan: the smallest weights it can make "
                          f"take {smallest} bytes, and no KV policy fits beside them ({tried})")
    ppl, policy, plan, fitted, held = best
    record_layers(fitted)
    return FitResult(fitted, policy, plan, measured.shapes(), int(budget_bytes), measured.fixed_bytes, held, ppl,
                     candidates, bool(measured.sensitivity))


def _ids(batch: Any) -> torch.Tensor:
    ids = batch.get("input_ids") if isinstance(batch, dict) else batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise OptionError("fxpress.fit: calibration batches must hold token ids [batch, tokens] "
                          "(a tensor, its first positional argument or input_ids=)")
    return ids


def _relative_error(approx: torch.Tensor, weight: torch.Tensor, gram: torch.Tensor) -> float:
    """``||(W' - W) X^T||^2 / ||W X^T||^2`` from ``G = X^T X``: ``trace(E G E^T) / trace(W G W^T)``."""
    error, exact = (approx.double() - weight.double()), weight.double()
    return float((error @ gram * error).sum() / (exact @ gram * exact).sum().clamp_min(1e-300))


@torch.no_grad()
def _options(layers: dict[str, nn.Linear], grams: dict[str, torch.Tensor], bits: Sequence[int],
             rank_ratios: Sequence[float], group_size: int, method: str):
    """Per layer, its options (bytes and error), and the compressed layers made on the way."""
    options: dict[str, list[Option]] = {}
    made: dict[tuple[str, str, int], nn.Module] = {}
    for name, layer in progress(layers.items(), "fit: options per layer", total=len(layers)):
        w, gram = layer.weight.detach().float(), grams[name]
        bias = FP16 * (layer.bias.numel() if layer.bias is not None else 0)
        found = [Option("dense", None, FP16 * w.numel() + bias, 0.0, 0.0)]
        for b in bits:
            weight = (lowbit.rtn(w, b, group_size) if method == "rtn" else
                      lowbit.bcq(w, b, group_size, importance=torch.diagonal(gram))).with_scales(torch.float16)
            made[(name, "bits", b)] = QuantizedLinear(weight, layer.bias, layer.out_features)
            error = _relative_error(weight.dequantize(), w, gram)
            found.append(Option("bits", b, weight.nbytes() + bias, error, error))
        for ratio in rank_ratios:
            r = int(ratio * w.shape[0] * w.shape[1] / sum(w.shape))
            if r < 1:
                continue
            low_rank, _, output_error = factor(layer, r, gram)
            made[(name, "rank", r)] = low_rank
            found.append(Option("rank", r, FP16 * r * sum(w.shape) + bias, output_error ** 2, output_error ** 2))
        options[name] = found
    return options, made


def _nbytes(option: Option) -> int:
    return option.nbytes


def _assemble(measured: Measured, plan: dict[str, Option]) -> nn.Module:
    fitted = copy.deepcopy(measured.model)
    table, head = measured.embedding or (None, None)
    for name, option in plan.items():
        if option.kind == "dense":
            continue
        made = copy.deepcopy(measured.made[(name, option.kind, option.value)])
        if name == table:
            install(fitted, table, head, made)
        else:
            set_submodule(fitted, name, made)
    return fitted
