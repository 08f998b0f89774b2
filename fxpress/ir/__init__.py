"""The graph vocabulary every pass and emitter shares: matching (``match``), what fxpress can
compile (``support``), graph verification (``verify``), the options passes read (``options``),
and where integer-only rewrites apply (``integer_sites``)."""
