#!/usr/bin/env bash
# Sets up .venv if needed, then runs the whole test suite (GPU tests skip without CUDA).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/venv.sh"
cd "$root"
exec .venv/bin/python -m pytest -q "$@"
