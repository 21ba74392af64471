#!/bin/bash
# LLaMA-3.1-8B, LoRA on the attention (adapters split with their layers), AutoTP 8 (the seeds' "LLaMA 3.1 8B + LoRA").
# Predicted peak per GPU (bench-plan, H100-80GB): 5.7 GiB training, 4.9 GiB loading, fits
# Submit from the repository root: mkdir -p logs && sbatch slurm/model_parallel/llama31_8b_lora/8_gpus.sh [bench/run.py overrides...]
#SBATCH --job-name=lora-tp8-llama31-8b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

source "${BENCH_ROOT:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
bench_run --strategy tp --ds_config ds_configs/tp8.json --model llama3.1-8b --peft lora --micro_batch_size 4 \
    --global_batch_size 4 --seq_len 1024 --max_steps 50 --warmup_steps 5 --eval_interval 25 "$@"
