"""C kernels for CPUs (AVX2/FMA/F16C), built on first use: see build.py; entry points in ops.py."""
