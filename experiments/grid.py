"""The gamma_init x modality x seed grid (logic: gligen/experiments/grid.py).

    python experiments/grid.py expand | submit [-- sbatch args] | run-local | collect
    python experiments/grid.py trained CONFIG | sweep-cell CONFIG     # used by slurm/grid.sh

Every experiment: `--help`, `--print_config`, `--config FILE` (repeatable), flags and dotted overrides
(gligen/experiments/config.py).
"""

from gligen.experiments.entry import main

if __name__ == "__main__":
    main("grid")
