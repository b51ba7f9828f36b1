#!/bin/bash
# One srun task is one training rank: hand SLURM's task ids to torch.distributed, then become the
# command (exec, so that signals srun forwards reach Python directly). MASTER_ADDR and MASTER_PORT
# come from train.sbatch through the environment srun propagates.
#
#   srun slurm/task.sh python launch/train.py ARGS...
set -euo pipefail
export RANK=$SLURM_PROCID
export LOCAL_RANK=$SLURM_LOCALID
export WORLD_SIZE=$SLURM_NTASKS
exec "$@"
