"""What a training config consumes and what its data loader delivers, measured on the model and data the training
CLI builds from that same config (same LDM and text width, batch size, shards, workers): the loader-to-training
ratio of experiments/bench_data.py compares the two in one run.

`training_consumption` times optimisation steps on batches fetched beforehand (the loader out of the timing);
`loader_rate` times the loader alone. Either takes the config's own datamodule, or the same settings on other
shards (precomputed latents) or another worker count (`datamodule_like`).
"""

from __future__ import annotations

import gc
import inspect
import statistics
import time

import torch
from lightning import LightningDataModule

from gligen.bench.train_step import timed_step, train_step
from gligen.data.datamodule import GroundingDataModule
from gligen.module import GLIGENModule
from gligen.training.cli import GLIGENCLI
from gligen.training.rundir import TrainConfig, config_args


def build_training(train_config: TrainConfig, *overrides: str) -> tuple[GLIGENModule, GroundingDataModule]:
    """The model and datamodule `python -m gligen fit` builds from `train_config` (links applied), not trained."""
    args = [*config_args(train_config), "--trainer.logger", "false", "--run_dir", "null", *overrides]
    cli = GLIGENCLI(GLIGENModule, LightningDataModule, subclass_mode_data=True, run=False, args=args)
    return cli.model, cli.datamodule


def datamodule_like(datamodule: GroundingDataModule, **changes) -> GroundingDataModule:
    """The same data settings with `changes` (e.g. num_workers, train_shards + ratios)."""
    accepted = set(inspect.signature(GroundingDataModule.__init__).parameters) - {"self"}
    settings = {k: v for k, v in datamodule.hparams.items() if k in accepted}  # not the CLI's _class_path
    return GroundingDataModule(**{**settings, **changes})


def batches(datamodule: GroundingDataModule, n: int) -> list[dict]:
    """`n` training batches of the datamodule (its epoch made long enough)."""
    loader = iter(datamodule_like(datamodule, batches_per_epoch=n + 1).train_dataloader())
    try:
        return [next(loader) for _ in range(n)]
    finally:  # workers stopped now: left to the garbage collector, the loader may be collected inside the next
        del loader  # loader's forked worker, which then tries to stop processes that are not its children
        gc.collect()


def training_consumption(module: GLIGENModule, train_batches: list[dict], warmup: int = 1) -> dict:
    """Samples per second the training step consumes: median time of an optimisation step (diffusion loss,
    backward, AdamW) over `train_batches` after `warmup` untimed steps."""
    optimizer = module.configure_optimizers()["optimizer"]
    module.train()
    torch.manual_seed(0)
    for batch in train_batches[:warmup]:
        train_step(module, batch, optimizer)
    times = [timed_step(module, batch, optimizer) for batch in train_batches[warmup:]]
    if not times:
        raise ValueError(f"give more than {warmup} batches: the first {warmup} are warm-up")
    step = statistics.median(times)
    return {"train_step_s": step, "train_samples_per_s": len(train_batches[0]["keys"]) / step}


def loader_rate(datamodule: GroundingDataModule, n: int) -> float:
    """Steady-state samples per second of the loader alone: the first batch (worker start-up, first shard open) is
    not timed."""
    loader = iter(datamodule_like(datamodule, batches_per_epoch=n + 1).train_dataloader())
    try:
        next(loader)
        start = time.perf_counter()
        count = sum(len(next(loader)["keys"]) for _ in range(n))
        return count / (time.perf_counter() - start)
    finally:  # workers stopped now: left to the garbage collector, the loader may be collected inside the next
        del loader  # loader's forked worker, which then tries to stop processes that are not its children
        gc.collect()

