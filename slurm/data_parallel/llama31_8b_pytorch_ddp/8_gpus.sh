#!/bin/bash
# LLaMA-3.1-8B, LoRA, PyTorch DistributedDataParallel (beside ZeRO-0, the llama31_8b_ddp scripts) on 8 GPU(s): micro-
# batches of 4 per GPU, global batch 32 at every GPU count (strong scaling: one job, so the report compares and scales
# them).
# Predicted peak per GPU (bench-plan, H100-80GB): 18.4 GiB training, 16.7 GiB loading, fits
# Submit from the repository root: mkdir -p logs && sbatch slurm/data_parallel/llama31_8b_pytorch_ddp/8_gpus.sh [bench/run.py overrides...]
#SBATCH --job-name=pytorch-ddp-llama31-8b-8g
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

source "${BENCH_ROOT:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
bench_run --strategy ddp --ds_config ds_configs/ddp.json --model llama3.1-8b --peft lora --micro_batch_size 4 \
    --global_batch_size 32 --seq_len 1024 --max_steps 50 --warmup_steps 5 --eval_interval 25 "$@"
