"""Time the README's two commands on a fresh clone (logic: gligen/experiments/time_readme.py).

    python experiments/time_readme.py main | tests [--isa avx2]

Every experiment: `--help`, `--print_config`, `--config FILE` (repeatable), flags and dotted overrides
(gligen/experiments/config.py).
"""

from gligen.experiments.entry import main

if __name__ == "__main__":
    main("time_readme")
