#!/bin/bash
# N nodes x 8 GPUs (default 2 nodes; `sbatch --nodes=N slurm/multi_node.sh` to change): LLaMA-3.1-8B, LoRA, ZeRO-3
# data parallel. srun starts one task per GPU on every node; ranks come from SLURM_PROCID/SLURM_LOCALID, the
# rendezvous from the first node of the allocation (common.sh).
# Predicted peak per GPU (bench-plan, H100-80GB): 6.2 GiB training, 3.0 GiB loading, fits
# Submit from the repository root: mkdir -p logs && sbatch slurm/multi_node.sh [bench/run.py overrides...]
# --val_fraction 0.2: the bundled sample's validation split then holds one micro-batch for each of the 16 ranks.
#SBATCH --job-name=dp-llama31-8b-multinode
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

source "${BENCH_ROOT:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
bench_run --strategy dp --ds_config ds_configs/dp_zero3.json --model llama3.1-8b --peft lora --micro_batch_size 4 \
    --seq_len 1024 --max_steps 50 --warmup_steps 5 --eval_interval 25 --val_fraction 0.2 "$@"
