#!/usr/bin/env bash
# Creates (once) the Python virtual environment with the peers ckmerge is measured
# against and the tools that make fixtures: torch, transformers, tokenizers, mergekit.
# It lives outside the repository (torch's wheel brings ~6 GB of CUDA libraries even
# for CPU use). Never a dependency of the Rust build or of CI.
#   CKMERGE_PEERS_VENV  where to put it (default ~/.cache/ckmerge/peers-venv)
set -euo pipefail
venv=${CKMERGE_PEERS_VENV:-$HOME/.cache/ckmerge/peers-venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import torch, transformers, tokenizers, mergekit" 2>/dev/null; then
  "$venv/bin/pip" install -q mergekit transformers tokenizers safetensors
fi
echo "$venv"
