#!/bin/bash
# Mixtral-8x7B, LoRA on the attention with the experts frozen, AutoEP 4 (the seeds' "Mixtral + LoRA + EP").
# Predicted peak per GPU (bench-plan, H100-80GB): 28.8 GiB training, 28.3 GiB loading, fits
# Submit from the repository root: mkdir -p logs && sbatch slurm/model_parallel/mixtral_8x7b/4_gpus.sh [bench/run.py overrides...]
#SBATCH --job-name=lora-ep4-mixtral-8x7b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

source "${BENCH_ROOT:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
bench_run --strategy ep --ds_config ds_configs/ep4.json --model mixtral-8x7b --peft lora --micro_batch_size 2 \
    --global_batch_size 16 --seq_len 1024 --max_steps 50 --warmup_steps 5 --eval_interval 25 "$@"
