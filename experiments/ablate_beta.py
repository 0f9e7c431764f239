"""Scheduled-sampling sweep: grounding and image quality against tau (logic: gligen/experiments/ablate_beta.py).

    python experiments/ablate_beta.py                       # toy world: sweeps the shipped checkpoint
    python experiments/ablate_beta.py --rebuild --retrain   # ... pretrains the toy LDM and trains GLIGEN here first

Every experiment: `--help`, `--print_config`, `--config FILE` (repeatable), flags and dotted overrides
(gligen/experiments/config.py).
"""

from gligen.experiments.entry import main

if __name__ == "__main__":
    main("ablate_beta")
