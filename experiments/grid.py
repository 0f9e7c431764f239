"""The gamma_init x modality x seed grid (logic: gligen/grid.py).

    python experiments/grid.py expand | submit [-- sbatch args] | run-local | collect
    python experiments/grid.py trained CONFIG | sweep-cell CONFIG     # used by slurm/grid.sh
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing too

from gligen.grid import main

if __name__ == "__main__":
    main()
