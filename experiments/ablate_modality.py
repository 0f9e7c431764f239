"""Grounding modalities side by side (logic: gligen/experiments/ablate_modality.py).

    python experiments/ablate_modality.py                     # toy world: builds / trains what is missing, then scores
    python experiments/ablate_modality.py --modalities [box,image] --seeds [0,1] --num_images 100

Every experiment: `--help`, `--print_config`, `--config FILE` (repeatable), flags and dotted overrides
(gligen/experiments/config.py).
"""

from gligen.experiments.entry import main

if __name__ == "__main__":
    main("ablate_modality")
