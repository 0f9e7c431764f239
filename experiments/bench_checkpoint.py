"""Checkpoint save / load time of an SD-1.x GLIGEN job (logic: gligen/experiments/bench_checkpoint.py).

    python experiments/bench_checkpoint.py --dir runs/bench_checkpoint --repeats 3

Every experiment: `--help`, `--print_config`, `--config FILE` (repeatable), flags and dotted overrides
(gligen/experiments/config.py).
"""

from gligen.experiments.entry import main

if __name__ == "__main__":
    main("bench_checkpoint")
