"""Data-loading throughput against what training consumes, image path vs precomputed-latent path.

    python experiments/bench_data.py --out results/bench/data.csv   # the toy box training config, measured here
    python experiments/bench_data.py --train_config [a.yaml,b.yaml] --workers [0,1,2]
    python experiments/bench_data.py --train_config null --shards data/coco --latent_shards data/coco_pre \
        --resolution 512 --batch_size 8 --train_samples_per_s 40

With a train config (default: experiments/configs/toy_base.yaml + toy_box.yaml) the model and datamodule are the
ones `python -m gligen fit` builds from it (gligen.bench.consumption): its training step is timed on prefetched
batches (samples/s it consumes, with training's threads), and its loader alone (one thread per loader process), at
each worker count, in the same run; the ratio of the two is the headline (a ratio below 1: the accelerator would
wait for data). The image path reads the config's own train shards and mixing ratios; the latent path reads toy
shards precomputed with the config's LDM (its text width), through the same data settings, and its consumption is
timed on those latent batches. Without a train config the ratio is to --train_samples_per_s. With --out, one CSV
row per (path, workers) with the machine, processor class, threads, git commit and command. Settings:
BenchDataConfig (gligen/experiments/config.py).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from gligen.bench.consumption import batches, build_training, datamodule_like, loader_rate, training_consumption
from gligen.bench.machine import machine_columns
from gligen.data.convert.precompute import PrecomputeConfig, precompute_shards
from gligen.data.datamodule import GroundingDataModule
from gligen.evaluation.reporting import command_line
from gligen.evaluation.results import append_csv
from gligen.experiments.config import BenchDataConfig, parse
from gligen.provenance import git_commit
from gligen.toy.pipeline import TinyPipelineConfig, build_tiny_pipeline
from gligen.toy.world import write_split
from gligen.training.rundir import describe_config


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
    return loader_rate(GroundingDataModule(train_shards={"bench": spec}, resolution=resolution, batch_size=batch_size,
                                           num_workers=workers, batches_per_epoch=batches + 1), batches)


def main(argv: list[str] | None = None) -> None:
    args = parse(BenchDataConfig, argv, name="bench_data", description=__doc__)
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        rows = against_training(args, Path(tmp)) if args.train_config else against_given_rate(args, Path(tmp))
    if args.out:
        commit, command = git_commit(), command_line()
        append_csv([{**row, "git_commit": commit, "command": command} for row in rows], args.out)


def against_training(args, root: Path) -> list[dict]:
    """Loader rates against the measured consumption of `args.train_config`, both paths, in this one run."""
    module, datamodule = build_training(args.train_config)
    settings = datamodule.hparams
    text_width = module.ldm.text_encoder.config.hidden_size
    print(f"{describe_config(args.train_config)}: batch {settings.batch_size}, {settings.resolution} px, "
          f"{settings.num_workers} worker(s), text width {text_width}, {args.train_steps} timed steps")
    image_shards = toy_shards(root, args.toy_samples, settings.resolution)
    latent_spec = args.latent_shards or toy_latent_shards(root, image_shards, settings.resolution,
                                                           module.hparams.pretrained)
    paths = {"image": datamodule,  # the config's own shards and mixing ratios
             "latent": datamodule_like(datamodule, train_shards={"latent": latent_spec}, ratios={"latent": 1.0})}
    print(f"{'path':<8} {'workers':>7} {'samples/s':>10} {'training':>10} {'x training':>10}")
    rows, train_threads = [], args.train_threads or torch.get_num_threads()  # training's own: every core
    for name, data in paths.items():
        torch.set_num_threads(train_threads)
        consumed = training_consumption(module, batches(data, args.train_steps + 1))
        torch.set_num_threads(1)  # one thread per loader process, as in training
        for workers in args.workers:
            rate = loader_rate(datamodule_like(data, num_workers=workers), args.batches)
            ratio = rate / consumed["train_samples_per_s"]
            print(f"{name:<8} {workers:>7} {rate:>10.1f} {consumed['train_samples_per_s']:>10.1f} {ratio:>10.2f}",
                  flush=True)
            rows.append({"path": name, "workers": workers, "samples_per_s": rate,
                         "samples_per_s_per_worker": rate / max(1, workers),
                         "train_samples_per_s": consumed["train_samples_per_s"], "x_training": ratio,
                         "train_step_s": consumed["train_step_s"], "config_workers": workers == settings.num_workers,
                         "resolution": settings.resolution, "batch_size": settings.batch_size,
                         "text_width": text_width, "train_threads": train_threads,
                         "train_config": describe_config(args.train_config),
                         "shards": "train config" if name == "image" else "toy, precomputed with its LDM",
                         **machine_columns(), "torch": torch.__version__})
    return rows


def against_given_rate(args, root: Path) -> list[dict]:
    """Loader rates against a consumption rate given by hand (--train_samples_per_s), for shards without a config."""
    torch.set_num_threads(1)  # one thread per loader process, as in training
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
    return rows


if __name__ == "__main__":
    main()
