"""Scheduled-sampling sweep: grounding accuracy and image quality against tau (beta = 1 for the first tau of steps).

    python experiments/ablate_beta.py                       # toy world: writes its shards, sweeps the shipped model
    python experiments/ablate_beta.py --rebuild --retrain   # ... pretrains the toy LDM and trains GLIGEN here first
    python experiments/ablate_beta.py --pretrained runwayml/stable-diffusion-v1-5 --ckpt my.ckpt \\
        --val_shards data/coco2014val --detector my/detr-dir --resolution 512 --steps 50 --guidance 7.5
    python experiments/ablate_beta.py --print_config > my.yaml; python experiments/ablate_beta.py --config my.yaml

Settings: BetaSweepConfig (gligen/experiments/config.py), defaults experiments/configs/ablate_beta.yaml.

Writes <out>/metrics.csv (one row per tau x seed, with git commit and config hash), summary.md (mean +- std per
tau), ap_fid_vs_tau.png, samples_tau<tau>.png grids with the layout drawn, and TensorBoard events in
<out>/tensorboard (sample grids, HParams with hp/ metrics), and timings.json (wall time of each stage, machine,
processor class, threads, command).

On the toy world the base LDM and the box-grounded checkpoint of the committed results ship with the package
(gligen/toy/shipped): the default run writes the toy shards and sweeps that checkpoint. --rebuild pretrains the
toy LDM here instead of copying the shipped one; --retrain trains GLIGEN (experiments/configs/toy_base.yaml +
toy_box.yaml, run dir runs/toy_box) instead of using the shipped checkpoint, as happens anyway when the base or the
train config differ from the shipped ones. The toy world is in use when pretrained and val_shards are unset or in
toy_cache (gligen.toy.build.is_toy_world, the rule every experiment applies).
"""

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from gligen.bench.machine import machine_columns
from gligen.evaluation.reporting import command_line
from gligen.evaluation.results import git_commit
from gligen.experiments.config import BetaSweepConfig, parse
from gligen.experiments.sweep import sweep_checkpoint
from gligen.toy.build import ensure_toy_world, ldm_dir, shard_dir
from gligen.toy.shipped import reference_checkpoint
from gligen.training.cli import fit_from_config

SWITCHES = ("rebuild", "retrain")  # how to get there, not what is measured: not in the sweep's config (hash)


def main(argv=None) -> None:
    settings = parse(BetaSweepConfig, argv, name="ablate_beta", description=__doc__)
    config = {k: v for k, v in asdict(settings).items() if k not in SWITCHES}
    command = command_line(argv, program="experiments/ablate_beta.py")
    torch.manual_seed(0)
    stages = {}
    cache = config["toy_cache"]
    start = time.perf_counter()  # the train shards only when something trains here
    toy = ensure_toy_world(cache, config["toy_config"], [config["pretrained"], config["val_shards"]],
                           shipped=not settings.rebuild, train_splits=settings.retrain)
    if toy:
        config["pretrained"] = config["pretrained"] or str(ldm_dir(cache))
        config["val_shards"] = config["val_shards"] or str(shard_dir(cache, "val", "grounding"))
        shipped = None
        if config["ckpt"] is None:
            shipped = None if settings.retrain else reference_checkpoint(config["train_config"], config["pretrained"])
            if shipped is None:
                ensure_toy_world(cache, config["toy_config"], shipped=not settings.rebuild)
        stages["toy_build_s"] = round(time.perf_counter() - start, 1)
        if shipped is not None:
            config["ckpt"] = str(shipped.relative_to(Path.cwd()) if shipped.is_relative_to(Path.cwd()) else shipped)
            print(f"sweeping the shipped reference checkpoint {config['ckpt']} (--retrain trains it here)")
    if toy and config["ckpt"] is None:  # outside the toy world a ckpt is required (sweep_checkpoint says so)
        start = time.perf_counter()
        config["ckpt"] = str(fit_from_config(config["train_config"]))
        stages["train_s"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    sweep_checkpoint(config)  # gligen/experiments/sweep.py: the same sweep every grid cell runs
    stages["sweep_s"] = round(time.perf_counter() - start, 1)
    timings = {"command": command, "git_commit": git_commit(), **stages, "ckpt": config["ckpt"],
               **machine_columns()}
    (Path(config["out"]) / "timings.json").write_text(json.dumps(timings, indent=1) + "\n")
    print(f"wrote {config['out']} ({', '.join(f'{k} {v}' for k, v in stages.items())})")
