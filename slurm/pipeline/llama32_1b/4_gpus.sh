#!/bin/bash
# LLaMA-3.2-1B, LoRA, hybrid: 2 pipeline stages x 2 data-parallel replicas.
# Predicted peak per GPU (bench-plan, H100-80GB): 3.9 GiB training, 2.5 GiB loading, fits
# Submit from the repository root: mkdir -p logs && sbatch slurm/pipeline/llama32_1b/4_gpus.sh [bench/run.py overrides...]
#SBATCH --job-name=pp2dp2-llama32-1b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

source "${BENCH_ROOT:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
bench_run --strategy hybrid --ds_config ds_configs/pp2_dp2.json --model llama3.2-1b --peft lora --micro_batch_size 2 \
    --global_batch_size 16 --seq_len 1024 --max_steps 50 --warmup_steps 5 --eval_interval 25 "$@"
