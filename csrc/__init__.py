"""C++ sources of the CPU kernels (installed as `hybridrag.csrc`, built by `hybridrag.kernels.cpp`)."""
