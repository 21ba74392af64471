#!/bin/bash
# LLaMA-3.1-8B, full fine-tune, AutoTP 4.
# Predicted peak per GPU (bench-plan, H100-80GB): 48.0 GiB training, 6.7 GiB loading, fits
# Submit from the repository root: mkdir -p logs && sbatch slurm/model_parallel/llama31_8b/4_gpus.sh [bench/run.py overrides...]
#SBATCH --job-name=full-tp4-llama31-8b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

source "${BENCH_ROOT:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
bench_run --strategy tp --ds_config ds_configs/tp4.json --model llama3.1-8b --peft none --micro_batch_size 4 \
    --global_batch_size 4 --seq_len 1024 --max_steps 50 --warmup_steps 5 --eval_interval 25 "$@"
