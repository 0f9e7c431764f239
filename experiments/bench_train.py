"""Training-step cost: ours vs an official-style step vs the FLOP limit (logic: gligen/experiments/bench_train.py).

    python experiments/bench_train.py --sizes [toy,sd] --repeats 3 --out results/bench/train.csv

Every experiment: `--help`, `--print_config`, `--config FILE` (repeatable), flags and dotted overrides
(gligen/experiments/config.py).
"""

from gligen.experiments.entry import main

if __name__ == "__main__":
    main("bench_train")
