#!/bin/bash
# LLaMA-3.1-8B, LoRA, PyTorch FSDP2 without resharding after forward (beside ZeRO-2, the llama31_8b scripts) on 4
# GPU(s): micro-batches of 4 per GPU, global batch 32 at every GPU count (strong scaling: one job, so the report
# compares and scales them).
# Predicted peak per GPU (bench-plan, H100-80GB): 22.3 GiB training, 16.7 GiB loading, fits
# Submit from the repository root: mkdir -p logs && sbatch slurm/data_parallel/llama31_8b_fsdp2/4_gpus.sh [bench/run.py overrides...]
#SBATCH --job-name=fsdp2-llama31-8b-4g
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

source "${BENCH_ROOT:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
bench_run --strategy fsdp2 --ds_config ds_configs/fsdp2_no_reshard.json --model llama3.1-8b --peft lora \
    --micro_batch_size 4 --global_batch_size 32 --seq_len 1024 --max_steps 50 --warmup_steps 5 --eval_interval 25 \
    "$@"
