"""C++ kernels (torch extension `sparamx.kernels._C`), their Python wrappers and the runtime loader."""
