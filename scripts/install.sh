#!/usr/bin/env bash
# Make (or reuse) the project's virtual environment .venv with everything build, serve and tests need.
# Idempotent: a stamp of pyproject.toml skips the pip work when nothing changed.
# numpy stays < 2 because Triton 2.51's python backend stub garbles tensors under numpy 2.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${BUILDER_VENV:-$root/.venv}
py=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
stamp="$venv/.builder-installed"
want=$(cat "$root/pyproject.toml" "$0" | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
  # torch first, pinned, so that nothing pulls the multi-GB CUDA wheels on a CPU machine
  "$venv/bin/python" -c "import torch" 2>/dev/null || "${pip[@]}" "torch==${TORCH_VERSION:-2.13.0}"
  "${pip[@]}" -e "$root[test]"
  # the Triton server 2.51 binary + python backend; only its files are needed, not its Python deps
  "${pip[@]}" --no-deps "nvidia-pytriton==0.7.0"
  echo "$want" > "$stamp"
fi
echo "$venv"
