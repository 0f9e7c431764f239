"""This project's sampler vs diffusers' GLIGEN pipeline (logic: gligen/experiments/bench_sample.py).

    python experiments/bench_sample.py --ckpt runs/toy_box/checkpoints/last.ckpt --steps 25 --guidance 3 --tau 0.3

Every experiment: `--help`, `--print_config`, `--config FILE` (repeatable), flags and dotted overrides
(gligen/experiments/config.py).
"""

from gligen.experiments.entry import main

if __name__ == "__main__":
    main("bench_sample")
