"""Throughput benchmark: see nanovllm/benchmark.py (also `python -m nanovllm.benchmark`)."""

import sys

from nanovllm.benchmark import main

if __name__ == "__main__":
    main(sys.argv[1:])
