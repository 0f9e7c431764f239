"""The paper's design claims as arms of one experiment (logic: gligen/experiments/ablate_claims.py).

    python experiments/ablate_claims.py

Every experiment: `--help`, `--print_config`, `--config FILE` (repeatable), flags and dotted overrides
(gligen/experiments/config.py).
"""

from gligen.experiments.entry import main

if __name__ == "__main__":
    main("ablate_claims")
