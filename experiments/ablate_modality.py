"""Grounding modalities side by side (logic: gligen/modality_ablation.py).

    python experiments/ablate_modality.py                     # toy world: builds / trains what is missing, then scores
    python experiments/ablate_modality.py --modalities box image --seeds 0 1 --num-images 100
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing too

from gligen.modality_ablation import main

if __name__ == "__main__":
    main()
