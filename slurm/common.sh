# Shared by every sbatch script in slurm/: sourced, never run. It sets up the environment, prints the start and
# end blocks, starts one task per GPU with srun, and turns a preempted run into a requeue.
#
# Environment knobs (all optional):
#   BENCH_ROOT        repository root (default: the sbatch submit directory)
#   BENCH_PYTHON      python to run (default: python on PATH; sbatch exports the submitting shell's PATH)
#   BENCH_CACHE_BASE  base for caches kept away from $HOME (default: $BENCH_ROOT/.cache)
#   BENCH_MODULES     space-separated `module load` names, e.g. "cuda/12.4 nccl" (default: none)
#   BENCH_CONTAINER   apptainer/singularity image to run inside with --nv (default: none)
#   BENCH_REQUEUE     1 (default) to requeue the job when the run reports preemption (exit 75)
#   MASTER_PORT       rendezvous port (default: derived from the job id)

BENCH_ROOT=${BENCH_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$BENCH_ROOT" || { echo "error: BENCH_ROOT $BENCH_ROOT does not exist" >&2; exit 2; }

bench_setup_env() {
    # Caches away from $HOME (small quotas, shared across nodes), created if missing.
    local base=${BENCH_CACHE_BASE:-$BENCH_ROOT/.cache}
    export TORCH_HOME=${TORCH_HOME:-$base/torch} HF_HOME=${HF_HOME:-$base/huggingface}
    export HF_DATASETS_CACHE=${HF_DATASETS_CACHE:-$base/huggingface/datasets}
    export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$base/triton} WANDB_DIR=${WANDB_DIR:-$base/wandb}
    export BENCH_CACHE=${BENCH_CACHE:-$base/bench} BENCH_MODELS_DIR=${BENCH_MODELS_DIR:-$BENCH_ROOT/models}
    export TMPDIR=${BENCH_TMPDIR:-$base/tmp}
    mkdir -p "$TORCH_HOME" "$HF_HOME" "$HF_DATASETS_CACHE" "$TRITON_CACHE_DIR" "$WANDB_DIR" "$BENCH_CACHE" "$TMPDIR"
    if [ -n "${BENCH_MODULES:-}" ]; then
        module purge
        for m in $BENCH_MODULES; do module load "$m"; done
    fi
    # One rendezvous for every task of every node: the first node of the allocation.
    export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
    # Below the kernel's ephemeral ports (32768-60999), which any connection on the node may be given before rank 0
    # binds this one, and below the launchers' default 29500.
    export MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 9000))}
    export PYTHONUNBUFFERED=1
}

bench_start_block() {
    BENCH_T0=$(date +%s)
    echo "=================================================================="
    echo "Job ID        : ${SLURM_JOB_ID:-none} (${SLURM_JOB_NAME:-})"
    echo "Nodes         : ${SLURM_JOB_NODELIST:-$(hostname)} (${SLURM_NNODES:-1} x ${SLURM_NTASKS_PER_NODE:-1} tasks)"
    echo "Master        : $MASTER_ADDR:$MASTER_PORT"
    echo "Start time    : $(date '+%Y-%m-%d %H:%M:%S')"
    echo "=================================================================="
}

bench_end_block() {
    local rc=$1 t=$(( $(date +%s) - BENCH_T0 ))
    echo "=================================================================="
    echo "End time      : $(date '+%Y-%m-%d %H:%M:%S')"
    printf 'Total time    : %02d:%02d:%02d\n' $((t / 3600)) $((t % 3600 / 60)) $((t % 60))
    echo "Exit code     : $rc"
    echo "=================================================================="
}

# bench_run ARGS...: bench/run.py on every task (one per GPU); arguments after the script name given to sbatch
# reach here through "$@" and override the script's own (argparse takes the last value). The run is named after
# the job (name-id, stable across requeues) and resumes: a requeued job continues from its last checkpoint.
bench_run() {
    bench_setup_env
    bench_start_block
    local -a cmd=("${BENCH_PYTHON:-python}" bench/run.py --run_name "${SLURM_JOB_NAME:-bench}-${SLURM_JOB_ID:-0}"
                  --resume auto "$@")
    if [ -n "${BENCH_CONTAINER:-}" ]; then
        local runtime; runtime=$(command -v apptainer || command -v singularity)
        cmd=("$runtime" exec --nv "$BENCH_CONTAINER" "${cmd[@]}")
    fi
    # Each task keeps the CPUs the job asked for per task: srun of Slurm 22.05 and later does not take
    # --cpus-per-task from sbatch, and a task of one CPU would run the rank, its data path, heartbeat, monitor and
    # W&B writer on that one CPU (bench/distributed.py cpu_share).
    local -a per_task=()
    [ -n "${SLURM_CPUS_PER_TASK:-}" ] && per_task=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    echo "Task command  : srun --kill-on-bad-exit=1 ${per_task[*]} ${cmd[*]}"
    # srun in the background so this shell can take the pre-timeout signal (--signal=B:USR1@N) and pass it on.
    srun --kill-on-bad-exit=1 "${per_task[@]}" "${cmd[@]}" &
    local srun_pid=$!
    trap 'echo "signal: asking the run to stop at the next step"; kill -USR1 $srun_pid 2>/dev/null' USR1 TERM
    local rc=0
    wait $srun_pid || rc=$?
    while kill -0 $srun_pid 2>/dev/null; do  # wait returns early when a trapped signal arrives
        wait $srun_pid; rc=$?
    done
    bench_end_block "$rc"
    if [ "$rc" -eq 75 ] && [ "${BENCH_REQUEUE:-1}" = 1 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
        echo "preempted: requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$rc"
}
