"""Re-verify results folders from their own files: summaries recomputed from the rows, checkpoints against the
recorded weights hashes, config hashes, commits (logic: gligen/experiments/verify.py).

    python experiments/verify.py                          # every results folder under results/
    python experiments/verify.py results/ablate_beta      # one

Every experiment: `--help`, `--print_config`, `--config FILE` (repeatable), flags and dotted overrides
(gligen/experiments/config.py).
"""

from gligen.experiments.entry import main

if __name__ == "__main__":
    main("verify")
