#!/bin/bash
# Download a Hugging Face checkpoint once into the shared model directory, so every run reads the same
# read-only copy: $BENCH_MODELS_DIR/<preset> (default models/<preset>), which bench/run.py --model <preset> finds.
#   bash slurm/import_model.sh llama3.1-8b        (or: sbatch slurm/import_model.sh mixtral-8x7b)
# Gated models need `huggingface-cli login` (or HF_TOKEN) first.
#SBATCH --job-name=import-model
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=0
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
MODEL=${1:?usage: import_model.sh PRESET_OR_HUB_ID}
cd "${BENCH_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
"${BENCH_PYTHON:-python}" - "$MODEL" <<'PY'
import os, sys
from huggingface_hub import snapshot_download
from bench.models import PRESETS
name = sys.argv[1]
repo = PRESETS[name].hub_id if name in PRESETS else name
if repo is None:
    sys.exit(f"error: {name} is built locally, nothing to download")
target = os.path.join(os.environ.get("BENCH_MODELS_DIR", "models"), name.replace("/", "--"))
snapshot_download(repo_id=repo, local_dir=target, allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
print(f"{repo} -> {target}")
PY
