"""transformers integration: the compressed KV cache ``model.generate`` uses.

    cache = fxpress.kv_cache(model, max_len=4096, policy=fxpress.KIVI(bits=2))

Importing ``fxpress.hf.kv_cache`` imports transformers, as does the first call of
``fxpress.hf.cache_argument`` (the keyword the installed transformers takes a cache under);
nothing else in fxpress does.
"""
