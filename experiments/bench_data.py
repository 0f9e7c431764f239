"""Data-loading throughput: image path vs precomputed latents (logic: gligen/experiments/bench_data.py).

    python experiments/bench_data.py --workers [0,1,2] --train_samples_per_s 40 --out results/bench/data.csv

Every experiment: `--help`, `--print_config`, `--config FILE` (repeatable), flags and dotted overrides
(gligen/experiments/config.py).
"""

from gligen.experiments.entry import main

if __name__ == "__main__":
    main("bench_data")
