"""Data-loading throughput: image path vs precomputed-latent path through GroundingDataModule.

    python experiments/bench_data.py [--workers [0,1,2]] [--train_samples_per_s 40] [--out results/bench/data.csv]
    python experiments/bench_data.py --shards data/coco --latent_shards data/coco_pre --resolution 512

Without --shards it writes toy shards (gligen.toy.world.write_split, 32 px) and, without --latent_shards,
precomputes them with a tiny random pipeline, all in a temporary directory. Prints samples/s, samples/s per
worker, and the ratio to the training consumption rate (--train_samples_per_s = batch_size / step time):
a ratio below 1 means the GPU would wait for data. With --out, one CSV row per (path, workers) with the machine,
torch version, git commit and command. Settings: BenchDataConfig (gligen/experiments/config.py).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from gligen.bench.machine import machine_columns
from gligen.data.convert.precompute import PrecomputeConfig, precompute_shards
from gligen.data.datamodule import GroundingDataModule
from gligen.evaluation.reporting import command_line
from gligen.evaluation.results import append_csv
from gligen.experiments.config import BenchDataConfig, parse
from gligen.provenance import git_commit
from gligen.toy.pipeline import TinyPipelineConfig, build_tiny_pipeline
from gligen.toy.world import write_split


def toy_shards(root: Path, n: int, resolution: int) -> str:
    write_split("train", "grounding", n, str(root / "images"), resolution=resolution, max_samples=64,
                with_entities=False)
    return str(root / "images")


def toy_latent_shards(root: Path, image_spec: str, resolution: int, pretrained: str | None) -> str:
    if pretrained is None:
        pretrained = str(build_tiny_pipeline(root / "ldm", TinyPipelineConfig(image_size=resolution)))
    precompute_shards(pretrained, image_spec, str(root / "latents"), PrecomputeConfig(resolution, flip=True),
                      max_samples=64, progress=False)
    return str(root / "latents")


def samples_per_s(spec: str, resolution: int, batch_size: int, workers: int, batches: int) -> float:
    """Steady-state rate: the first batch (worker start-up, first shard open) is not timed."""
    dm = GroundingDataModule(train_shards={"bench": spec}, resolution=resolution, batch_size=batch_size,
                             num_workers=workers, batches_per_epoch=batches + 1)
    loader = iter(dm.train_dataloader())
    next(loader)
    start = time.perf_counter()
    count = sum(len(batch["keys"]) for batch in loader)
    return count / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    args = parse(BenchDataConfig, argv, name="bench_data", description=__doc__)
    torch.set_num_threads(1)  # one thread per loader process, as in training

    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        root = Path(tmp)
        image_spec = args.shards or toy_shards(root, args.toy_samples, args.resolution)
        latent_spec = args.latent_shards or toy_latent_shards(root, image_spec, args.resolution, args.pretrained)
        print(f"resolution {args.resolution}, batch size {args.batch_size}, {args.batches} timed batches")
        header = f"{'path':<8} {'workers':>7} {'samples/s':>10} {'per worker':>10}"
        if args.train_samples_per_s:
            header += f" {'x training':>10}"
        print(header)
        rows = []
        for name, spec in (("image", image_spec), ("latent", latent_spec)):
            for workers in args.workers:
                rate = samples_per_s(spec, args.resolution, args.batch_size, workers, args.batches)
                line = f"{name:<8} {workers:>7} {rate:>10.1f} {rate / max(1, workers):>10.1f}"
                ratio = rate / args.train_samples_per_s if args.train_samples_per_s else None
                if ratio is not None:
                    line += f" {ratio:>10.2f}"
                print(line, flush=True)
                rows.append({"path": name, "workers": workers, "samples_per_s": rate,
                             "samples_per_s_per_worker": rate / max(1, workers),
                             "train_samples_per_s": args.train_samples_per_s or "", "x_training": ratio or "",
                             "resolution": args.resolution, "batch_size": args.batch_size,
                             "shards": args.shards or "toy", **machine_columns(), "torch": torch.__version__})
    if args.out:
        commit, command = git_commit(), command_line()
        append_csv([{**row, "git_commit": commit, "command": command} for row in rows], args.out)


if __name__ == "__main__":
    main()
