# Sourced by slurm/train.sh and slurm/grid.sh (after `cd` to the repository root): sets PYTHON, the interpreter
# of the jobs: $PYTHON when given, else `python` of the active venv, else of ./.venv.
if [ -z "${PYTHON:-}" ]; then
    if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
        # shellcheck disable=SC1091
        . .venv/bin/activate
    fi
    PYTHON=python
fi
export PYTHON
