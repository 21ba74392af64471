#!/bin/bash
# Mixtral-8x7B, LoRA, ZeRO-3 data parallel on 2 GPUs (the bf16 weights alone are ~94 GB, so they are partitioned).
# Predicted peak per GPU (bench-plan, H100-80GB): 51.9 GiB training, 48.5 GiB loading, fits
# Submit from the repository root: mkdir -p logs && sbatch slurm/data_parallel/mixtral_8x7b/2_gpus.sh [bench/run.py overrides...]
#SBATCH --job-name=dp-mixtral-8x7b-2g
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --gpus-per-node=2
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

source "${BENCH_ROOT:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
bench_run --strategy dp --ds_config ds_configs/dp_zero3.json --model mixtral-8x7b --peft lora --micro_batch_size 2 \
    --global_batch_size 16 --seq_len 1024 --max_steps 50 --warmup_steps 5 --eval_interval 25 "$@"
