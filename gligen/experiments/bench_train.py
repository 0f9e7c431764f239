"""Training-step cost: this project's step vs an official-style step vs the machine's FLOP limit.

    python experiments/bench_train.py --sizes [toy,sd] --repeats 3 --out results/bench/train.csv
    python experiments/bench_train.py --sizes [sd] --precision bf16 --channels_last --compile   # "ours" optimised
    python experiments/bench_train.py --sizes [sd] --image_size 512 --batch_size 8 --device cuda --precision bf16
    python experiments/bench_train.py --sizes [sd] --precision bf16 --half_frozen   # + memory with fp32 frozen weights

On one model and batch per size: (a) ours = precomputed latents and text features, no gradients for frozen
weights; (b) official-style = VAE encode + text encoder every step, gradients for all UNet weights (only the
grounding weights are updated), fp32; (c) the limit = the step's FLOPs (FlopCounterMode) / dense fp32 matmul
throughput measured in the same run (in ours' precision: bf16 runs are measured against the bf16 peak where the
device computes bf16 natively; where it emulates bf16, e.g. an AVX2-only CPU, no bf16 peak or MFU is reported).
Every row records the processor class, its ISA flags (AVX2 / AVX-512 / AVX512-BF16 / AMX) and native_bf16. Times
are medians of alternating a, b, a, b, ... steps after one warm-up each. Memory: CUDA max_memory_allocated on GPU;
on CPU a fresh subprocess per variant reading its peak RSS (details in gligen/bench/train_step.py). Prints the a/b
time ratio, MFU of (a) and the a/b memory ratio per size and appends one row per size to --out (machine, torch
version, git commit, command). Settings: BenchTrainConfig (gligen/experiments/config.py): `--help`,
`--print_config`, `--config`.
"""

from __future__ import annotations

import dataclasses

import torch

from gligen.bench.train_step import PRECISIONS, SIZES, StepOptions, bench_size, summary
from gligen.evaluation.reporting import command_line
from gligen.evaluation.results import append_csv
from gligen.experiments.config import BenchTrainConfig, parse
from gligen.provenance import git_commit


def make_size(name: str, image_size: int | None = None, batch_size: int | None = None):
    size = SIZES[name]()
    if image_size:
        size = dataclasses.replace(size, pipeline=dataclasses.replace(size.pipeline, image_size=image_size))
    if batch_size:
        size = dataclasses.replace(size, batch_size=batch_size)
    return size


def run(sizes: list[str], repeats: int, device: str, memory: bool = True, out: str | None = None,
        command: str | None = None, options: StepOptions | None = None, image_size: int | None = None,
        batch_size: int | None = None, peak_size: int | None = None, log=print,
        memory_official: bool = True) -> list[dict]:
    rows = []
    commit = git_commit()
    for name in sizes:
        row = bench_size(make_size(name, image_size, batch_size), repeats=repeats, device=device, memory=memory,
                         options=options, peak_size=peak_size, log=log, memory_official=memory_official)
        row.update({"git_commit": commit, "command": command or ""})
        log(summary(row))
        rows.append(row)
        if out:
            append_csv([row], out)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    config = parse(BenchTrainConfig, argv, name="bench_train", description=__doc__)
    unknown = [s for s in config.sizes if s not in SIZES]
    if unknown or config.precision not in PRECISIONS:
        raise SystemExit(f"bench_train: sizes must be among {sorted(SIZES)} (got {unknown}), precision among "
                         f"{sorted(PRECISIONS)} (got {config.precision!r})")
    command = command_line(argv, program="experiments/bench_train.py")
    options = StepOptions(config.precision, config.channels_last, config.compile, config.half_frozen)
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return run(config.sizes, config.repeats, device, memory=config.memory, out=config.out or None,
               command=command, options=options, image_size=config.image_size, batch_size=config.batch_size,
               memory_official=config.memory_official)
