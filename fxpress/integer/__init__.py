"""Integer-only inference (I-BERT / I-ViT): options, calibration, constants and the integer algorithms.

``fxpress.IntegerOnly`` configures the ``integer_only`` pass; ``fxpress.calibrate_integer``
(``fxpress.compiler.calibrate``) measures per-tensor scales into an ``IntegerCalibration``. The algorithms live in ``arith`` (the ops' references) and, as Triton kernels,
in ``fxpress.ops.kernels.integer``.
"""
