#!/usr/bin/env bash
# Install what the tests need into .venv, then run the whole test suite (real tritonserver, tritonclient, transformers).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$("$root/scripts/install.sh")
cd "$root"
exec "$venv/bin/python" -m pytest -q -rs "$@"
