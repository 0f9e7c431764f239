"""Training-step cost: this project's step vs an official-style step vs the machine's FLOP limit.

    python experiments/bench_train.py --sizes toy sd --repeats 3 --out results/bench/train.csv

On one model and batch per size: (a) ours = precomputed latents and text features, no gradients for frozen
weights; (b) official-style = VAE encode + text encoder every step, gradients for all UNet weights (only the
grounding weights are updated), fp32; (c) the limit = the step's FLOPs (FlopCounterMode) / dense fp32 matmul
throughput measured in the same run. Times are medians of alternating a, b, a, b, ... steps after one warm-up
each. Memory: CUDA max_memory_allocated on GPU; on CPU a fresh subprocess per variant reading its peak RSS
(details in gligen/bench.py). Prints the a/b time ratio, MFU of (a) and the a/b memory ratio per size and
appends one row per size to --out (machine, torch version, git commit, command).
"""

from __future__ import annotations

import argparse
import csv
import shlex
import sys
from pathlib import Path

import torch

from gligen.bench import SIZES, bench_size, summary
from gligen.results import git_commit


def append_rows(rows: list[dict], path: str | Path) -> None:
    """Append to a CSV; the header is written when the file is new (new columns go into a fresh header)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old_rows, fields = [], list(dict.fromkeys(k for row in rows for k in row))
    if path.exists() and path.stat().st_size:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            old_rows, old_fields = list(reader), list(reader.fieldnames or [])
        fields = list(dict.fromkeys(old_fields + fields))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(old_rows + rows)


def run(sizes: list[str], repeats: int, device: str, memory: bool = True, out: str | None = None,
        command: str | None = None, log=print) -> list[dict]:
    rows = []
    commit = git_commit()
    for name in sizes:
        row = bench_size(SIZES[name](), repeats=repeats, device=device, memory=memory, log=log)
        row.update({"git_commit": commit, "command": command or ""})
        log(summary(row))
        rows.append(row)
        if out:
            append_rows([row], out)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["toy", "sd"], choices=sorted(SIZES))
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant (alternating)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument("--out", default="results/bench/train.csv", help="CSV to append to ('' = none)")
    args = parser.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in ["experiments/bench_train.py", *(
        sys.argv[1:] if argv is None else argv)])
    return run(args.sizes, args.repeats, args.device, memory=not args.no_memory, out=args.out or None,
               command=command)


if __name__ == "__main__":
    main()
