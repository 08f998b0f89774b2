"""Ahead of time: compile SmolLM2's decode step with 4-bit weights and a KIVI-compressed KV cache
into an artifact folder, load it in a fresh process, and generate.

1. ``fxpress.compress.quantize`` gives the decoder 4-bit RTN weights (``lut_matmul`` keeps them
   packed); transformers' export recipe holds a StaticCache as buffers; ``kv=fxpress.KIVI(bits=4)``
   replaces the cache reads and writes with compressed state.
2. ``fxpress.aot_compile`` exports it, runs the pipeline and writes the folder;
   ``fxpress inspect`` would print the same summary as here.
3. A fresh Python process runs ``fxpress.load`` and generates greedily; the tokens are compared
   with the same compile run in this process.

Run: ``python examples/aot_artifact.py`` (after ``bash scripts/setup.sh``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import fxpress
from fxpress import workloads

PROMPT = "The capital of France is"
NEW_TOKENS = 12
MAX_LEN = 48


def greedy(step, prompt: list[int], new: int) -> list[int]:
    """The decode step one token at a time, as a serving loop calls it (prompt, then greedy)."""
    tokens = list(prompt)
    with torch.no_grad():
        for i in range(len(prompt) + new - 1):
            logits = step(input_ids=torch.tensor([[tokens[i]]]), cache_position=torch.tensor([i]))
            if i >= len(prompt) - 1:
                tokens.append(int(logits[0, -1].argmax()))
    return tokens


def decode_step(model, max_len: int = MAX_LEN):
    """The decoder's one-token step with its StaticCache held as buffers (transformers' export recipe)."""
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    config = model.generation_config
    before, config.cache_implementation = config.cache_implementation, "static"  # the recipe requires it
    try:
        return TorchExportableModuleWithStaticCache(model, batch_size=1, max_cache_len=max_len)
    finally:
        config.cache_implementation = before  # generate() with a cache of its own refuses both


def main() -> None:
    model, tokenizer = workloads.load_smollm2()
    quantized = fxpress.compress.quantize(model, bits=4, group_size=128, method="rtn")
    print(quantized)
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids[0].tolist()
    policy = fxpress.KIVI(bits=4, group_size=32, residual=32)
    folder = Path(tempfile.mkdtemp()) / "smollm2-step.fxpress"
    example = {"input_ids": torch.tensor([[1]]), "cache_position": torch.tensor([0])}
    fxpress.aot_compile(decode_step(quantized.model), (), folder, example_kwargs=example, kv=policy,
                        progress=lambda stage: print(f"  {stage}"))
    meta = fxpress.compiler.artifact.read_meta(folder)
    sizes = {name: record["bytes"] for name, record in meta["files"].items()}
    print(f"artifact {folder}: " + ", ".join(f"{n} {b / 2**20:.2f} MiB" for n, b in sizes.items()))
    print("ops after the passes:", {k: v for k, v in meta["ops"].items() if k.startswith("fxpress.")})
    here = greedy(torch.compile(decode_step(quantized.model), backend=fxpress.backend(kv=policy)), prompt, NEW_TOKENS)
    # The fresh process imports fxpress and this file's greedy loop, nothing of the model.
    script = (f"import json, sys, fxpress; sys.path.insert(0, {str(Path(__file__).parent)!r}); from aot_artifact import greedy; "
              "print(json.dumps(greedy(fxpress.load(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3]))))")
    done = subprocess.run([sys.executable, "-c", script, str(folder), json.dumps(prompt), str(NEW_TOKENS)],
                          capture_output=True, text=True, check=True)
    loaded = json.loads(done.stdout)
    print(f"fresh process: {tokenizer.decode(loaded)!r}")
    print(f"{NEW_TOKENS} greedy tokens from the loaded artifact identical to the in-process compile: {loaded == here}")


if __name__ == "__main__":
    main()
