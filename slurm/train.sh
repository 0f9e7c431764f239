#!/usr/bin/env bash
# Train GLIGEN under Slurm: one task per device, on 1 or N nodes, with requeue on preemption / time limit.
#
#   sbatch slurm/train.sh                                   # the toy box model: toy_base + toy_box -> runs/toy_box
#                                                           # (first writes what cache/toy lacks)
#   CONFIG=experiments/configs/my.yaml RUN_DIR=runs/my sbatch slurm/train.sh [--more.cli overrides ...]
#   sbatch --nodes=2 --ntasks-per-node=4 --gres=gpu:4 slurm/train.sh --trainer.accelerator gpu
#
# Submit from the repository root (paths below are relative to it). Environment overrides (exported to the job by
# sbatch's default --export=ALL): CONFIG (one YAML, or several separated by spaces, composed in order as repeated
# --config; default "experiments/configs/toy_base.yaml experiments/configs/toy_box.yaml"), RUN_DIR (default
# runs/toy_box), PYTHON (default: `python` of the active venv, else of ./.venv). Arguments after the script go to
# `python -m gligen fit` (LightningCLI), after the ones set here, so they win.
# Devices: --trainer.num_nodes / --trainer.devices come from SLURM_NNODES / SLURM_NTASKS_PER_NODE, so the header
# (or sbatch's command line) is the one place to say how many: ntasks-per-node = devices (GPUs) per node; ranks
# come from Lightning's SLURMEnvironment (SLURM_PROCID, ...). On GPUs uncomment --gres with the same count.
# Logs: slurm/logs/<job name>-<job id>.out/.err (appended across requeues). Run: RUN_DIR/ holds TensorBoard events,
# config.yaml, checkpoints/last.ckpt (every --checkpoint_every steps, default 500, and at the end) and
# hpc_ckpt_<n>.ckpt (written on requeue).
# Requeue: Slurm sends SIGUSR1 90 s before the time limit (or `scancel --signal=USR1 <jobid>`; SIGTERM, what
# preemption sends, does the same); at the next safe point (step boundary, validation batch, sampler step) every rank
# saves RUN_DIR/hpc_ckpt_<n>.ckpt, rank 0 runs `scontrol requeue`, and the requeued job (same job id,
# SLURM_RESTART_COUNT+1) resumes from the newest of hpc_ckpt_<n>.ckpt and last.ckpt at the exact global step. A job
# that could not be requeued exits 3 (saved, unfinished). Lead time: an SD-1.x GLIGEN checkpoint (209 M trainable
# weights + AdamW moments, 2.3 GiB) saved in 5.6-9.1 s on a 2-core AVX-512 (+bf16) AMD EPYC's virtual disk
# (experiments/bench_checkpoint.py -> results/bench/checkpoint_save.csv); 90 s leaves room for a shared file system
# several times slower, the rest of a step and the requeue. Raise it if your file system writes under ~50 MB/s.
#SBATCH --job-name=gligen
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
##SBATCH --gres=gpu:1
#SBATCH --time=04:00:00
#SBATCH --signal=USR1@90
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --error=slurm/logs/%x-%j.err
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
# shellcheck source=slurm/env.sh
. slurm/env.sh  # PYTHON
CONFIG=${CONFIG:-experiments/configs/toy_base.yaml experiments/configs/toy_box.yaml}
CONFIG_ARGS=()
for file in $CONFIG; do CONFIG_ARGS+=(--config "$file"); done
RUN_DIR=${RUN_DIR:-runs/toy_box}
NNODES=${SLURM_NNODES:-1}
TASKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-$(( ${SLURM_NTASKS:-1} / NNODES ))}

# the toy default needs the toy world + toy LDM (cache/toy); build it once, on the batch host, before the ranks start
if [[ " $CONFIG " == *" experiments/configs/toy_base.yaml "* ]]; then  # idempotent: writes only what is missing
    echo "[train.sh] building the toy world in cache/toy (python -m gligen.toy build)"
    "$PYTHON" -m gligen.toy build --out cache/toy --config experiments/configs/toy_world.yaml
fi
echo "[train.sh] $(date -u +%FT%TZ) job ${SLURM_JOB_ID:-none} restart ${SLURM_RESTART_COUNT:-0}" \
     "nodes ${NNODES} (${SLURM_JOB_NODELIST:-localhost}) tasks/node ${TASKS_PER_NODE}: ${CONFIG} -> ${RUN_DIR}"
srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
    "$PYTHON" -m gligen fit "${CONFIG_ARGS[@]}" --run_dir "$RUN_DIR" \
    --trainer.num_nodes "$NNODES" --trainer.devices "$TASKS_PER_NODE" "$@"
