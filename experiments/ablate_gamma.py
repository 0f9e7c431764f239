"""Gamma-init ablation, locally: the gamma axis of the grid, trained here (logic: gligen/experiments/ablate_gamma.py).

    python experiments/ablate_gamma.py --config experiments/configs/ablate_gamma_quick.yaml --sweep.enabled true

Every experiment: `--help`, `--print_config`, `--config FILE` (repeatable), flags and dotted overrides
(gligen/experiments/config.py).
"""

from gligen.experiments.entry import main

if __name__ == "__main__":
    main("ablate_gamma")
