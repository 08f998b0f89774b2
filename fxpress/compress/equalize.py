"""Activation-aware input scaling (AWQ, Lin et al., 2023), folded into the op before each Linear.

A Linear's output does not change when its input column ``j`` is multiplied by ``s_j`` and its
input divided by ``s_j``. Low-bit groups then spend more of their levels on the columns scaled up:
AWQ scales up the columns whose inputs carry the most energy, ``s = (E[x^2])^(alpha/2)`` (normalised
so that ``max(s) * min(s) = 1``), with ``alpha`` chosen per group of Linears by the output error of
their quantised weights on the calibration inputs (``alpha = 0`` is no scaling, always a candidate).
The division by ``s`` is folded where it costs nothing: into the RMSNorm before Q/K/V and before
gate/up (its weight), and into up's rows before down. O's inputs are left alone: with grouped-query
attention several of its heads read one V head, so one column scale per V channel would not do.

Only Llama-style decoder layers qualify (``input_layernorm``, ``self_attn.{q,k,v}_proj``,
``post_attention_layernorm``, ``mlp.{gate,up,down}_proj``), and only when every Linear of a group
is being quantised and each norm's output scales with its weight (checked on a random input, which
rules out Gemma's ``1 + weight``); every other layer is quantised unscaled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import fxpress.lowbit as lowbit

ALPHAS = (0.0, 0.25, 0.5)  # a trial on SmolLM2's 120 groups (O's too): 0.25 won 108, 0 won 9, 0.5 won 3
# BCQ's refinements when choosing alpha: all of them, as measured (4 made quantising SmolLM2 take
# 233 s instead of 414 s; its perplexity with 4 is not measured)
SEARCH_ROUNDS = lowbit.BCQ_ROUNDS


@dataclass(frozen=True)
class Group:
    """Linears that read one input, and what divides that input by ``s``: a norm's weight, or the
    rows of the Linear that writes it."""

    linears: tuple[str, ...]
    before: str  # the module whose output the linears read
    before_is_norm: bool


def llama_groups(model: nn.Module, targeted: set[str]) -> list[Group]:
    """The groups of Llama-style decoder layers whose Linears are all in ``targeted``."""
    groups = []
    for name, module in model.named_modules():
        attention, mlp = getattr(module, "self_attn", None), getattr(module, "mlp", None)
        if not (hasattr(module, "input_layernorm") and hasattr(module, "post_attention_layernorm")):
            continue
        prefix = f"{name}." if name else ""
        candidates = []
        if attention is not None and all(hasattr(attention, p) for p in ("q_proj", "k_proj", "v_proj")):
            candidates.append(Group(tuple(f"{prefix}self_attn.{p}_proj" for p in "qkv"), f"{prefix}input_layernorm",
                                    True))
        if mlp is not None and all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
            candidates.append(Group((f"{prefix}mlp.gate_proj", f"{prefix}mlp.up_proj"),
                                    f"{prefix}post_attention_layernorm", True))
            candidates.append(Group((f"{prefix}mlp.down_proj",), f"{prefix}mlp.up_proj", False))
        groups += [g for g in candidates if set(g.linears) <= targeted and _scalable(model, g)]
    return groups


def _scalable(model: nn.Module, group: Group) -> bool:
    before = model.get_submodule(group.before)
    if not group.before_is_norm:
        return type(before) is nn.Linear
    weight = getattr(before, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return False
    with torch.no_grad():  # the norm's output must scale with its weight: norm(x; w * 2) = 2 norm(x; w)
        x = torch.randn(2, weight.numel(), generator=torch.Generator().manual_seed(0)).to(weight)
        base = before(x)
        saved = weight.clone()
        weight.mul_(2)
        doubled = before(x)
        weight.copy_(saved)
    return bool(torch.allclose(doubled, 2 * base, rtol=1e-4, atol=1e-6))


def _output_error(weight: torch.Tensor, gram: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int) -> float:
    """Relative output error of weighted BCQ (SEARCH_ROUNDS rounds) on the scaled weight: the fast
    stand-in for the final quantiser when choosing alpha."""
    scaled_gram = gram / scale.double().unsqueeze(0) / scale.double().unsqueeze(1)
    q = lowbit.bcq(weight * scale, bits, group_size, rounds=SEARCH_ROUNDS,
                   importance=torch.diagonal(scaled_gram).clamp(min=0))
    error = (q.dequantize() / scale - weight).double()
    exact = weight.double()
    return float((error @ gram * error).sum() / (exact @ gram * exact).sum().clamp(min=1e-300))


@torch.no_grad()
def equalize(model: nn.Module, layers: dict[str, nn.Linear], grams: dict[str, torch.Tensor], bits: int,
             group_size: int) -> dict[str, float]:
    """Scale the input columns of each qualifying group of ``layers`` in ``model`` (in place), fold
    the inverse into the op before, and update ``grams`` to the scaled inputs' Gram matrices.
    Returns ``{first linear of a group: the chosen alpha}``."""
    chosen = {}
    for group in llama_groups(model, set(layers)):
        gram = grams[group.linears[0]]
        energy = torch.diagonal(gram).float().clamp(min=0)
        energy = (energy / energy.mean().clamp(min=1e-30)).clamp(min=1e-8)
        best = None
        for alpha in ALPHAS:
            scale = energy ** (alpha / 2)
            scale = scale / (scale.max() * scale.min()).sqrt()
            error = sum(_output_error(layers[n].weight.detach().float(), grams[n], scale, bits, group_size)
                        for n in group.linears)
            if best is None or error < best[0]:
                best = (error, alpha, scale)
        _, alpha, scale = best
        chosen[group.linears[0]] = alpha
        if alpha == 0.0:
            continue
        before = model.get_submodule(group.before)
        if group.before_is_norm:
            before.weight.div_(scale.to(before.weight))
        else:  # the rows of the Linear that writes these inputs
            before.weight.div_(scale.to(before.weight).unsqueeze(1))
            if before.bias is not None:
                before.bias.div_(scale.to(before.bias))
        for name in group.linears:
            layers[name].weight.mul_(scale.to(layers[name].weight))
            grams[name] = grams[name] / scale.double().unsqueeze(0) / scale.double().unsqueeze(1)
    return chosen
