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
from gligen.evaluation.reporting import command_line, write_seed_summary
from gligen.evaluation.results import read_csv
from gligen.experiments.config import BetaSweepConfig, parse
from gligen.experiments.sweep import sweep_checkpoint
from gligen.provenance import git_commit
from gligen.toy.build import ensure_toy_world, ldm_dir, shard_dir
from gligen.toy.shipped import reference_checkpoint
from gligen.training.cli import fit_from_config
from gligen.training.rundir import seed_run

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
    if settings.train_seeds:
        if toy:  # the other seeds train here: the train shards must exist
            ensure_toy_world(cache, config["toy_config"], shipped=not settings.rebuild)
        seed_checkpoints = replicate(config, settings.train_seeds, shipped_ckpt=config["ckpt"] if toy else None,
                                     stages=stages)
    else:
        if toy and config["ckpt"] is None:  # outside the toy world a ckpt is required (sweep_checkpoint says so)
            start = time.perf_counter()
            config["ckpt"] = str(fit_from_config(config["train_config"]))
            stages["train_s"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        sweep_checkpoint(config)  # gligen/experiments/sweep.py: the same sweep every grid cell runs
        stages["sweep_s"] = round(time.perf_counter() - start, 1)
        seed_checkpoints = {}
    timings = {"command": command, "git_commit": git_commit(), **stages,
               "ckpt": seed_checkpoints or config["ckpt"], **machine_columns()}
    (Path(config["out"]) / "timings.json").write_text(json.dumps(timings, indent=1) + "\n")
    print(f"wrote {config['out']} ({', '.join(f'{k} {v}' for k, v in stages.items())})")


def replicate(config: dict, train_seeds: list[int], shipped_ckpt: str | None, stages: dict) -> dict[int, str]:
    """One model per training seed (the train config's own seed: its run_dir, or the shipped checkpoint when that
    is what it trains; others: run_dir_seed<s>), each swept into <out>/train_seed<s>; then the summary over all.
    Returns training seed -> checkpoint."""
    if config.get("ckpt") and not shipped_ckpt:
        raise SystemExit("--train_seeds trains one model per seed: give train_config, not ckpt (one checkpoint is "
                         "one training seed)")
    out, checkpoints, rows = Path(config["out"]), {}, []
    for seed in dict.fromkeys(int(s) for s in train_seeds):
        start = time.perf_counter()
        overrides, _ = seed_run(config["train_config"], seed)
        if not overrides and shipped_ckpt:  # the config's own seed: the shipped checkpoint is what it trains
            ckpt = shipped_ckpt
        else:
            ckpt = str(fit_from_config(config["train_config"], *overrides))
        stages[f"train_seed{seed}_train_s"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        seed_out = out / f"train_seed{seed}"
        sweep_checkpoint({**config, "ckpt": ckpt, "out": str(seed_out), "train_seed": seed},
                         provenance={"train_seed": seed})
        stages[f"train_seed{seed}_sweep_s"] = round(time.perf_counter() - start, 1)
        checkpoints[seed] = ckpt
        rows += read_csv(seed_out / "metrics.csv")
    write_seed_summary(out, rows, config)
    return checkpoints
