"""Entry points: the torch.compile backend, capture, the pass pipeline, explain/report, integer
calibration, and ahead-of-time artifacts (aot_compile, load)."""
