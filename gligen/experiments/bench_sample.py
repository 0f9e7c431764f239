"""This project's sampler vs diffusers' GLIGEN pipeline on the same exported weights (same steps, guidance, tau,
initial noise): median seconds per image of alternating runs, the ratio, and the largest pixel difference.
Settings: BenchSampleConfig (gligen/experiments/config.py).

    python experiments/bench_sample.py --ckpt runs/toy_box/checkpoints/last.ckpt --steps 25 --guidance 3 --tau 0.3
"""

import torch

from gligen.bench.machine import machine_columns
from gligen.bench.sampler import bench_sampler
from gligen.evaluation.reporting import command_line
from gligen.evaluation.results import append_csv
from gligen.experiments.config import BenchSampleConfig, parse
from gligen.provenance import git_commit

LAYOUT = {"prompt": "a red circle and a blue square", "phrases": ["a red circle", "a blue square"],
          "boxes": [[0.1, 0.1, 0.45, 0.45], [0.5, 0.4, 0.9, 0.85]]}


def main(argv=None) -> None:
    args = parse(BenchSampleConfig, argv, name="bench_sample", description=__doc__)
    row = bench_sampler(args.ckpt, LAYOUT, pretrained=args.pretrained, steps=args.steps, guidance=args.guidance,
                        tau=args.tau, repeats=args.repeats)
    row.update(**machine_columns(), torch=torch.__version__, git_commit=git_commit(), command=command_line())
    print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    append_csv([row], args.out)
