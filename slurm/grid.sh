#!/usr/bin/env bash
# One cell of a training grid per array task (written and submitted by `python experiments/grid.py submit`):
#
#   sbatch --array=0-<N-1> slurm/grid.sh results/grid/cells.txt [--more.cli overrides ...]
#
# CELLS_FILE (first argument) lists one training config per line; array task i runs line i+1:
#   1. training, via slurm/train.sh (same resources, requeue and resume behaviour; the config names its own
#      run_dir, results/grid/<cell>), skipped when the cell's last.ckpt already reached trainer.max_steps
#      (a requeued task whose training had finished goes straight to the sweep);
#   2. the cell's tau sweep (results/grid/<cell>/sweep/, config <out>/sweeps/<cell>.yaml written by expand), as one
#      more srun step with a single task (never once per rank), skipped when the training is not finished (its fit
#      was requeued) or the sweep is already done (sweep_done.json). SIGUSR1 during the sweep requeues the task;
#      the requeued task skips training and redoes the unfinished sweep.
# Submit from the repository root. Logs: slurm/logs/<job name>-<array job id>_<task id>.out/.err.
# Throttle with sbatch's --array=0-8%2 (at most 2 cells at once).
#SBATCH --job-name=gligen-grid
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
##SBATCH --gres=gpu:1
#SBATCH --time=04:00:00
#SBATCH --signal=USR1@90
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%A_%a.out
#SBATCH --error=slurm/logs/%x-%A_%a.err
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
# shellcheck source=slurm/env.sh
. slurm/env.sh  # PYTHON
CELLS_FILE=${1:?usage: sbatch --array=0-N slurm/grid.sh CELLS_FILE [overrides]}
shift
TASK=${SLURM_ARRAY_TASK_ID:?not an array task: submit with --array (experiments/grid.py submit does)}
CONFIG=$(sed -n "$((TASK + 1))p" "$CELLS_FILE")
[ -n "$CONFIG" ] || { echo "[grid.sh] no line $((TASK + 1)) in $CELLS_FILE" >&2; exit 1; }
RUN_DIR=$(sed -n 's/^run_dir: *//p' "$CONFIG" | tr -d "'\"")
[ -n "$RUN_DIR" ] || { echo "[grid.sh] $CONFIG names no run_dir" >&2; exit 1; }
export CONFIG RUN_DIR
echo "[grid.sh] $(date -u +%FT%TZ) array task ${TASK} restart ${SLURM_RESTART_COUNT:-0}: ${CONFIG}"

if "$PYTHON" experiments/grid.py trained "$CONFIG" "$@"; then
    echo "[grid.sh] ${RUN_DIR}: training already finished; not retrained"
else
    bash slurm/train.sh "$@"
fi
# sweep-cell itself returns at once when training is unfinished (a requeued fit) or the sweep is done
srun --kill-on-bad-exit=1 --nodes=1 --ntasks=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
    "$PYTHON" experiments/grid.py sweep-cell "$CONFIG" "$@"
echo "[grid.sh] $(date -u +%FT%TZ) array task ${TASK} done"
