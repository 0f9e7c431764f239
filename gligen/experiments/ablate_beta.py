"""Scheduled-sampling sweep: grounding accuracy and image quality against tau (beta = 1 for the first tau of steps).

    python experiments/ablate_beta.py                       # toy world: writes its shards, sweeps the 3 shipped models
    python experiments/ablate_beta.py --rebuild --retrain   # ... pretrains the toy LDM and trains GLIGEN here first
    python experiments/ablate_beta.py --pretrained runwayml/stable-diffusion-v1-5 --ckpt my.ckpt \\
        --val_shards data/coco2014val --detector my/detr-dir --resolution 512 --steps 50 --guidance 7.5
    python experiments/ablate_beta.py --print_config > my.yaml; python experiments/ablate_beta.py --config my.yaml

Settings: BetaSweepConfig (gligen/experiments/config.py), defaults experiments/configs/ablate_beta.yaml.

With train_seeds (default [0, 1, 2]) one model per training seed is swept, each into <out>/train_seed<s>/
(metrics.csv: one row per tau x sampling seed with the checkpoint's identity, summary.md, ap_fid_vs_tau.png,
samples_tau<tau>.png grids with the layout drawn, TensorBoard events with sample grids and HParams); <out> gets
metrics.csv over all of them, summary.md (per tau: mean over training seeds, their std and a 95% bootstrap interval;
each tau minus tau 0, paired), ap_fid_vs_tau.png and timings.json (wall time of each stage, machine, processor
class, threads, command). With train_seeds null, or a given --ckpt (one trained model), those files of the one
sweep go to <out> itself.

On the toy world the base LDM and the box-grounded checkpoints of the committed results ship with the package
(gligen/toy/shipped: training seeds 0, 1 and 2): the default run writes the toy shards and sweeps those three.
--rebuild pretrains the toy LDM here instead of copying the shipped one; --retrain trains GLIGEN
(experiments/configs/toy_base.yaml + toy_box.yaml, run dirs runs/toy_box and runs/toy_box_seed<s>) instead of
using the shipped checkpoints, as happens anyway for a seed not shipped or when the base or the train config differ
from the shipped ones. The toy world is in use when pretrained and val_shards are unset or in toy_cache
(gligen.toy.build.is_toy_world, the rule every experiment applies).
"""

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from gligen.bench.machine import machine_columns
from gligen.evaluation.reporting import command_line, write_seed_summary
from gligen.evaluation.results import read_rows
from gligen.experiments.config import BetaSweepConfig, parse
from gligen.experiments.sweep import sweep_checkpoint
from gligen.provenance import git_commit, portable_path
from gligen.toy.build import ensure_toy_world, ldm_dir, styled_shard_dir
from gligen.toy.shipped import reference_checkpoint
from gligen.training.cli import fit_from_config
from gligen.training.rundir import seed_run

SWITCHES = ("rebuild", "retrain")
TOY_IMAGE_SCORER = "toy_image"  # on the toy world: style_adherence and fidelity_error of every image
# the k-th trained model samples with seeds + k * SEED_STRIDE: every model draws its own noise, so the spread over
# models holds sampling noise too (at tau = 0 every model is the same base LDM: it would otherwise show none)
SEED_STRIDE = 1000  # how to get there, not what is measured: not in the sweep's config (hash)


def main(argv=None) -> None:
    settings = parse(BetaSweepConfig, argv, name="ablate_beta", description=__doc__)
    config = {k: v for k, v in asdict(settings).items() if k not in SWITCHES}
    command = command_line(argv, program="experiments/ablate_beta.py")
    torch.manual_seed(0)
    train_seeds = list(dict.fromkeys(int(s) for s in settings.train_seeds or []))
    if config["ckpt"] and train_seeds:  # a given checkpoint is one trained model: nothing to replicate
        print(f"--ckpt {config['ckpt']} is one trained model: train_seeds {train_seeds} not used")
        train_seeds = config["train_seeds"] = []
    stages, shipped = {}, {}
    cache = config["toy_cache"]
    start = time.perf_counter()  # the train shards only when something trains here
    toy = ensure_toy_world(cache, config["toy_config"], [config["pretrained"], config["val_shards"]],
                           shipped=not settings.rebuild, train_splits=settings.retrain)
    if toy:
        config["pretrained"] = config["pretrained"] or str(ldm_dir(cache))
        # layouts that ask for a background style the grounding data never shows: placement and style, the two
        # sides of scheduled sampling's trade-off, on the same images
        config["val_shards"] = config["val_shards"] or str(styled_shard_dir(cache, "val"))
        config["image_scorer"] = config["image_scorer"] or TOY_IMAGE_SCORER
        if config["ckpt"] is None and not settings.retrain:  # training seed -> the shipped checkpoint trained so
            for seed in train_seeds or [None]:
                path = reference_checkpoint(config["train_config"], config["pretrained"], seed=seed)
                if path is not None:
                    shipped[seed] = portable_path(path)
            print(f"sweeping the shipped checkpoints {sorted(shipped.values())} (--retrain trains them here)")
        if config["ckpt"] is None and len(shipped) < len(train_seeds or [None]):  # something trains: train shards
            ensure_toy_world(cache, config["toy_config"], shipped=not settings.rebuild)
        stages["toy_build_s"] = round(time.perf_counter() - start, 1)
    if train_seeds:
        seed_checkpoints = replicate(config, train_seeds, shipped, stages)
    else:
        if toy and config["ckpt"] is None:  # outside the toy world a ckpt is required (sweep_checkpoint says so)
            start = time.perf_counter()
            config["ckpt"] = shipped.get(None) or str(fit_from_config(config["train_config"]))
            stages["train_s"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        sweep_checkpoint(config)  # gligen/experiments/sweep.py: the same sweep every grid cell runs
        stages["sweep_s"] = round(time.perf_counter() - start, 1)
        seed_checkpoints = {}
    timings = {"command": command, "git_commit": git_commit(), **stages,
               "ckpt": seed_checkpoints or config["ckpt"], **machine_columns()}
    (Path(config["out"]) / "timings.json").write_text(json.dumps(timings, indent=1) + "\n")
    print(f"wrote {config['out']} ({', '.join(f'{k} {v}' for k, v in stages.items())})")


def replicate(config: dict, train_seeds: list[int], shipped: dict[int, str], stages: dict) -> dict[int, str]:
    """One model per training seed (`shipped` where the package ships it; else trained: the config's own seed in
    its run_dir, others in <run_dir>_seed<s>, gligen.training.rundir.seed_run), each swept into <out>/train_seed<s>
    with its own sampling seeds (SEED_STRIDE); then the summary over all. Returns training seed -> checkpoint."""
    out, checkpoints, rows = Path(config["out"]), {}, []
    for index, seed in enumerate(train_seeds):
        start = time.perf_counter()
        overrides, _ = seed_run(config["train_config"], seed)
        ckpt = shipped.get(seed) or str(fit_from_config(config["train_config"], *overrides))
        stages[f"train_seed{seed}_train_s"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        seed_out = out / f"train_seed{seed}"
        sampling = [s + SEED_STRIDE * index for s in config["seeds"]]  # this model's own sampling noise
        sweep_checkpoint({**config, "ckpt": ckpt, "out": str(seed_out), "train_seed": seed, "seeds": sampling},
                         provenance={"train_seed": seed})
        stages[f"train_seed{seed}_sweep_s"] = round(time.perf_counter() - start, 1)
        checkpoints[seed] = ckpt
        rows += read_rows(seed_out / "metrics.csv")
    write_seed_summary(out, rows, config)
    return checkpoints
