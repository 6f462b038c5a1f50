#!/usr/bin/env bash
# The project's test command: sets up .venv (tools/setup_env.sh), then runs the whole suite on CPU.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/tools/setup_env.sh"
cd "$root"
exec .venv/bin/python -m pytest -q tests "$@"
