#!/bin/bash
# LLaMA-3.1-8B, full fine-tune, ZeRO-3, activation checkpointing; Ulysses SP over 4 GPUs, 32k tokens per sample.
# Predicted peak per GPU (bench-plan, H100-80GB): 52.2 GiB training, 6.0 GiB loading, fits
# Submit from the repository root: mkdir -p logs && sbatch slurm/sequence_parallel/llama31_8b/4_gpus.sh [bench/run.py overrides...]
# The bundled SQuAD sample is padded to this length; pass --data <long documents: .jsonl or .txt, packed> for real
# long-context samples.
#SBATCH --job-name=full-sp4-llama31-8b-32k
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

source "${BENCH_ROOT:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
bench_run --strategy sp --ds_config ds_configs/sp4.json --model llama3.1-8b --peft none --activation_checkpointing \
    --micro_batch_size 1 --global_batch_size 1 --seq_len 32768 --packing off --max_steps 50 --warmup_steps 5 \
    --eval_interval 25 "$@"
