#!/usr/bin/env bash
# Sets up .venv if needed, then runs example.py.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/venv.sh"
cd "$root"
exec .venv/bin/python example.py "$@"
