#!/usr/bin/env bash
# Creates .venv and installs the harness. torch goes first and pinned: an unpinned torch pulled in by
# deepspeed/peft would be the newest CUDA build (several GB), even on a CPU machine.
#   TORCH_SPEC  pip's words for torch, installed first (default torch==2.13.0; on a CUDA node the build that
#               matches its driver, e.g. "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130")
#   VENV        virtual environment directory (default .venv)
# --with-test-deps also installs what the tests drive for real (root, apt): Debian's SLURM packages (a one-node
# cluster) and Chromium (renders the HTML report).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --with-test-deps ]; then
    missing=$(bash scripts/missing_test_deps.sh)  # each dependency checked on its own
    if [ -n "$missing" ]; then
        echo "installing the tests' system packages: $(echo $missing)"
        apt-get update -qq
        # shellcheck disable=SC2086 - one word per package
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
    else
        echo "the tests' system packages are present (SLURM, munge, Chromium)"
    fi
fi
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
bash scripts/install_torch.sh
python -m pip install -q -e ".[dev]"
# SIGTERM/SIGINT to the `deepspeed` command reach the ranks (DeepSpeed's runner forwards neither): a one-line .pth
# that lets the runner process, and no other, forward them (bench/launch_guard.py)
python -c "import os, site; from bench.launch_guard import PTH, PTH_LINE; open(os.path.join(site.getsitepackages()[0], PTH), 'w').write(PTH_LINE)"
python -c "import torch, deepspeed, transformers, peft, wandb; print('installed: torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| wandb', wandb.__version__)"
# DeepSpeed compiles its CPU communication op on first use (45-120 s on 2 cores); build it now, into this
# environment's own cache (bench/distributed.py points every run there), so the first run starts in seconds.
python -c "from bench.ops import build_cpu_comm_op; print('DeepSpeed CPU op:', build_cpu_comm_op())"
# ZeRO offload updates the offloaded optimizer states with DeepSpeed's CPU Adam, also compiled on first use (~1 min).
python -c "from bench.ops import build_cpu_adam; print('DeepSpeed CPU Adam:', build_cpu_adam())"
