"""This project's sampler vs diffusers' GLIGEN pipeline on the same exported weights (same steps, guidance, tau,
initial noise): median seconds per image of alternating runs, the ratio, and the largest pixel difference.

    python experiments/bench_sample.py --ckpt runs/toy_box/checkpoints/last.ckpt --steps 25 --guidance 3 --tau 0.3
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing too

from gligen.bench_sampling import bench_sampler  # noqa: E402
from gligen.machine import machine_columns  # noqa: E402
from gligen.reporting import command_line  # noqa: E402
from gligen.results import append_csv, git_commit  # noqa: E402

LAYOUT = {"prompt": "a red circle and a blue square", "phrases": ["a red circle", "a blue square"],
          "boxes": [[0.1, 0.1, 0.45, 0.45], [0.5, 0.4, 0.9, 0.85]]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="runs/toy_box/checkpoints/last.ckpt")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--tau", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="results/bench/sample.csv")
    args = parser.parse_args(argv)
    row = bench_sampler(args.ckpt, LAYOUT, pretrained=args.pretrained, steps=args.steps, guidance=args.guidance,
                        tau=args.tau, repeats=args.repeats)
    row.update(**machine_columns(), torch=torch.__version__, git_commit=git_commit(), command=command_line())
    print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    append_csv([row], args.out)


if __name__ == "__main__":
    main()
