"""The cpp target's kernels of fxpress ops: C++ sources beside the Python launchers that build them
(``fxpress.native.build``) and call them through ctypes."""
