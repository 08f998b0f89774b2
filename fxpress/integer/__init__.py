"""Integer-only inference (I-BERT / I-ViT): options, calibration, constants and the integer algorithms.

``fxpress.IntegerOnly`` configures the ``integer_only`` pass; ``fxpress.calibrate_integer`` measures
per-tensor scales. The algorithms live in ``arith`` (the ops' references) and, as Triton kernels,
in ``fxpress.codegen.kernels.integer``.
"""
