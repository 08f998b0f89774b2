"""Is a per-channel outlier budget worth its bytes in KIVI-2 (KVQuant keeps ~1 % of values in full
precision)? Simulated on SmolLM2: in every quantised group of keys, the ``n`` channels with the
widest range are put back at full precision (float16) after dequantisation; or, for values, each
token's ``n`` largest channels. Charged 2 bytes a kept number plus a 1-byte channel index (per
group for keys, per token for values). Measured as ``bench/fidelity.py smollm2_kv`` measures:
three Wikipedia articles, a 1536-token prefix, the perplexity of the next 256 tokens against an
uncompressed cache, the geometric mean of the ratios; the same policies without the budget in
the same run.

The simulation is a KV policy plug-in (``fxpress.kv.registry``): its store is a ``KIVIStore`` that
also keeps an exact copy of every token, which only the simulation reads and the bytes above
account for. It runs the reference attention (no decode kernel knows the budget).

Run: ``python bench/kv_outliers.py [--keys N] [--values N] [--json PATH]`` (2 and 2 by default:
each budget measured on its own, next to the same policy without it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fidelity import KV_ARTICLES, KV_PREFIX, KV_SCORED  # noqa: E402

from fxpress import workloads  # noqa: E402
from fxpress.hf.cache_argument import cache_argument  # noqa: E402
from fxpress.hf.kv_cache import kv_cache  # noqa: E402
from fxpress.hf.perplexity import perplexity  # noqa: E402
from fxpress.kv import KIVI  # noqa: E402
from fxpress.kv.kivi import KIVIStore  # noqa: E402
from fxpress.kv.registry import register_policy  # noqa: E402
from fxpress.kv.stores import Store  # noqa: E402


@dataclasses.dataclass(frozen=True)
class KIVIWithOutliers:
    """``kivi`` plus ``keys`` exact channels per quantised key group and ``values`` exact channels
    per quantised value row (simulated)."""

    kivi: KIVI
    keys: int = 0
    values: int = 0

    def describe(self) -> str:
        return f"{self.kivi.describe()} + {self.keys} key / {self.values} value outlier channels"


class OutlierStore(KIVIStore):
    def __init__(self, policy: KIVIWithOutliers, max_len: int, **kw) -> None:
        super().__init__(policy.kivi, max_len, **kw)
        self.outliers = policy
        self.exact_k = torch.zeros(self.batch, self.heads, max_len, self.head_dim)
        self.exact_v = torch.zeros_like(self.exact_k)

    def append(self, k, v, seen, mass=None) -> None:
        self.exact_k[:, :, seen:seen + k.shape[2]] = k.float()
        self.exact_v[:, :, seen:seen + v.shape[2]] = v.float()
        super().append(k, v, seen, mass)

    def attend(self, q, k, v, scale, rule):
        return Store.attend(self, q, k, v, scale, rule)

    def dequantize_range(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = super().dequantize_range(start, stop)
        exact_k = self.exact_k[:, :, self.sunk + start:self.sunk + stop].half().float()
        exact_v = self.exact_v[:, :, self.sunk + start:self.sunk + stop].half().float()
        if self.outliers.keys:
            g = self.policy.group_size
            groups = exact_k.unflatten(2, (-1, g))
            widest = (groups.amax(3) - groups.amin(3)).topk(self.outliers.keys, -1).indices
            index = widest[:, :, :, None, :].expand(-1, -1, -1, g, -1)
            k = k.unflatten(2, (-1, g)).scatter(4, index, groups.gather(4, index)).flatten(2, 3)
        if self.outliers.values:
            largest = exact_v.abs().topk(self.outliers.values, -1).indices
            v = v.scatter(3, largest, exact_v.gather(3, largest))
        return k, v

    def budget_bytes(self) -> int:
        """What the kept numbers would cost: 2 bytes each, plus a 1-byte channel index."""
        rows = self.batch * self.heads
        keys = self.quantised * self.outliers.keys * 2 + self.quantised // self.policy.group_size * self.outliers.keys
        return rows * (keys + self.quantised * self.outliers.values * 3)


register_policy(KIVIWithOutliers, lambda policy, layer, shape: OutlierStore(policy, shape.max_len, **shape.store_args()))


@torch.no_grad()
def main(keys: int, values: int) -> list[dict]:
    from transformers import DynamicCache

    model, tokenizer = workloads.load_smollm2()
    config = model.config
    fp16_bytes = 2 * config.num_key_value_heads * config.head_dim * 2 * config.num_hidden_layers * KV_PREFIX
    bases = {"KIVI-2 R=32": KIVI(bits=2, residual=32), "KIVI-2 as in the paper (sink 0, no key clipping)":
             KIVI(bits=2, sink=0, clip_keys=False)}
    policies = {}
    for name, kivi in bases.items():
        policies[name] = kivi
        if keys:
            policies[f"{name}, {keys} exact key channels per group"] = KIVIWithOutliers(kivi, keys, 0)
        if values:
            policies[f"{name}, {values} exact value channels per token"] = KIVIWithOutliers(kivi, 0, values)
    rows, ratios = [], {name: [] for name in policies}
    for index, title in KV_ARTICLES.items():
        ids = tokenizer(workloads.wikipedia_article(index), return_tensors="pt")["input_ids"][:, :KV_PREFIX + KV_SCORED]
        model.set_attn_implementation("sdpa")
        full = perplexity(model, ids, KV_PREFIX, DynamicCache(config=config))
        for name, policy in policies.items():
            measured = kv_cache(model, KV_PREFIX, policy)
            model(ids[:, :KV_PREFIX], **cache_argument(measured), logits_to_keep=1)
            held = measured.nbytes() + sum(getattr(layer.store, "budget_bytes", lambda: 0)() for layer in measured.layers)
            value = perplexity(model, ids, KV_PREFIX, kv_cache(model, KV_PREFIX + KV_SCORED, policy))
            rows.append({"variant": f"{title}: {name}", "kept": held / fp16_bytes, "value": value, "ratio": value / full})
            ratios[name].append(value / full)
            print(f"  {rows[-1]}", flush=True)
    print(f"\n| variant | KV bytes / fp16 at the prefix | perplexity | vs full cache |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['kept']:.3f} | {r['value']:.4f} | {r['ratio']:.4f} |")
    for name, values_ in ratios.items():
        mean = float(torch.tensor(values_).log().mean().exp())
        rows.append({"variant": f"all three: {name}", "ratio": mean})
        print(f"| all three: {name} | | | {mean:.4f} |")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=2, help="exact key channels per quantised group")
    parser.add_argument("--values", type=int, default=2, help="exact value channels per quantised token")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = main(args.keys, args.values)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
