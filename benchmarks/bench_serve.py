"""The serving benchmark; the same as ``nanovllm bench-serve`` (see nanovllm/server/bench_serve.py)."""

import sys

from nanovllm.server.bench_serve import main

if __name__ == "__main__":
    sys.exit(main())
