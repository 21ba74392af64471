#!/usr/bin/env bash
# Installs torch first, as TORCH_SPEC says: pip's words, split like a command line, so it may carry an index,
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130"
# (default torch==2.13.0: on this project's CPU machines the local CPU wheel).
set -euo pipefail
read -r -a torch_args <<< "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q "${torch_args[@]}"
