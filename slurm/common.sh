# shellcheck shell=bash
# Shared by train.sbatch and train_deepspeed.sbatch (sourced from the repository root).

# args, output_dir: the launch/train.py arguments of this job and its run folder. The default run
# folder is named by the job id, so that a requeued job (same id) finds its checkpoints; a requeued
# job (SLURM_RESTART_COUNT > 0) continues from them (--resume), or, when the earlier attempt ended
# before its first checkpoint, starts its own run folder again (--overwrite).
train_args() {
    args=("$@")
    output_dir=
    local arg prev=
    for arg in "$@"; do
        case $arg in --output_dir=*) output_dir=${arg#--output_dir=} ;; esac
        [[ $prev != --output_dir ]] || output_dir=$arg
        prev=$arg
    done
    if [[ -z $output_dir ]]; then
        output_dir=runs/slurm-$SLURM_JOB_ID
        args+=(--output_dir "$output_dir")
    fi
    ((${SLURM_RESTART_COUNT:-0} > 0)) || return 0
    if compgen -G "$output_dir/checkpoints/step-*" >/dev/null; then
        args+=(--resume)
    elif [[ -d $output_dir && " ${args[*]} " != *" --resume "* ]]; then
        args+=(--overwrite)
    fi
}

# hosts, MASTER_ADDR, MASTER_PORT: the allocation's nodes and the rendezvous on the first one.
rendezvous() {
    mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    # NodeAddr is how SLURM itself reaches a node: its host name unless the admin set an address.
    local head_addr
    head_addr=$(scontrol show node "${hosts[0]}" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
    export MASTER_ADDR=${MEGASPEC_MASTER_ADDR:-${head_addr:-${hosts[0]}}}
    # One port per job id, below Linux's ephemeral range (32768+), so jobs sharing a node differ.
    export MASTER_PORT=${MEGASPEC_MASTER_PORT:-$((15000 + SLURM_JOB_ID % 15000))}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    echo "megaspec: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on ${hosts[*]}," \
        "rendezvous $MASTER_ADDR:$MASTER_PORT"
}

# run_and_requeue FORWARD COMMAND...: run COMMAND in the background until it ends. On USR1 or
# TERM this script calls `FORWARD PID` (PID: the command's), which must get USR1 to the ranks: they
# finish the step, write a checkpoint and exit 75 (stopped, resume later). Returns 75 when the ranks
# stopped so, else the command's status; after a USR1 and such a stop it requeues the job first
# (unless MEGASPEC_REQUEUE=0). TERM never requeues from here: scancel means stop, and a
# PreemptMode=REQUEUE partition requeues by itself.
#
# "Stopped so" is exit 75, or a checkpoint written after the signal: srun --kill-on-bad-exit ends
# the tasks still running once the first one exits 75 (one DeepSpeed launcher per node notices its
# ranks' exit up to a second later than the other), and then reports 143, not 75.
run_and_requeue() {
    _forward=$1
    shift
    "$@" &
    _pid=$!
    trap '_on_signal USR1' USR1
    trap '_on_signal TERM' TERM
    local seen status
    # A trapped signal makes `wait` return early (status > 128): then wait for the command again.
    while :; do
        seen=$_signals
        status=0
        wait "$_pid" || status=$?
        ((_signals > seen && status > 128)) || break
    done
    if [[ -n $_stop_signal && $status != "$EXIT_STOPPED" && $(_latest) != "$_latest_at_signal" && -n $(_latest) ]]; then
        echo "megaspec: the ranks wrote checkpoint $(_latest) after SIG$_stop_signal and ended with $status: stopped"
        status=$EXIT_STOPPED
    fi
    if [[ $_stop_signal == USR1 && $status == "$EXIT_STOPPED" && ${MEGASPEC_REQUEUE:-1} == 1 ]]; then
        echo "megaspec: checkpoint written; requeueing job $SLURM_JOB_ID"
        # SLURM answers at once with SIGTERM to every process of this run, scontrol included: both
        # ignore it, so that this run still ends with status 75 rather than 143.
        trap '' TERM
        scontrol requeue "$SLURM_JOB_ID" || echo "megaspec: scontrol requeue exited with $?" >&2
    fi
    return "$status"
}

# The checkpoint tag `latest` names in the run folder (empty when there is none).
_latest() {
    cat "${output_dir:-}/checkpoints/latest" 2>/dev/null || true
}

EXIT_STOPPED=75 # launch/train.py: stopped early with a checkpoint (megaspec/train/errors.py)
_signals=0
_stop_signal=
_latest_at_signal=
_on_signal() {
    _signals=$((_signals + 1))
    [[ -n $_stop_signal ]] || _latest_at_signal=$(_latest)
    _stop_signal=$1
    echo "megaspec: got SIG$1: the ranks write a checkpoint at the end of this step and exit"
    "$_forward" "$_pid"
}
