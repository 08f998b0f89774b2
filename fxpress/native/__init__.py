"""C++ kernels built at run time: the compiler, the library cache, and loading (``build``)."""
