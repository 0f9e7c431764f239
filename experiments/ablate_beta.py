"""Scheduled-sampling sweep: grounding accuracy and image quality against tau (beta = 1 for the first tau of steps).

    python experiments/ablate_beta.py                       # toy world: writes its shards, sweeps the shipped model
    python experiments/ablate_beta.py --rebuild --retrain   # ... pretrains the toy LDM and trains GLIGEN here first
    python experiments/ablate_beta.py --pretrained runwayml/stable-diffusion-v1-5 --ckpt my.ckpt \\
        --val-shards data/coco2014val --detector my/detr-dir --resolution 512 --steps 50 --guidance 7.5

Writes <out>/metrics.csv (one row per tau x seed, with git commit and config hash), summary.md (mean +- std per
tau), ap_fid_vs_tau.png, samples_tau<tau>.png grids with the layout drawn, and TensorBoard events in
<out>/tensorboard (sample grids, HParams with hp/ metrics), and timings.json (wall time of each stage, machine,
processor class, threads, command).

On the toy world the base LDM and the box-grounded checkpoint of the committed results ship with the package
(gligen/toy/shipped): the default run writes the toy shards and sweeps that checkpoint. --rebuild pretrains the
toy LDM here instead of copying the shipped one; --retrain trains GLIGEN (experiments/configs/toy_box.yaml, run
dir runs/toy_box) instead of using the shipped checkpoint, as happens anyway when the base or the train config
differ from the shipped ones.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing too

from gligen.cli import fit_from_config  # noqa: E402
from gligen.machine import machine_columns  # noqa: E402
from gligen.reporting import command_line  # noqa: E402
from gligen.results import git_commit  # noqa: E402
from gligen.sweep import sweep_checkpoint  # noqa: E402

DEFAULTS = Path(__file__).parent / "configs" / "ablate_beta.yaml"


def parse_args(argv=None) -> dict:
    config = yaml.safe_load(DEFAULTS.read_text())
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML overriding experiments/configs/ablate_beta.yaml")
    for key in ("pretrained", "ckpt", "val_shards", "sampler", "detector", "out", "train_config", "toy_cache",
                "toy_config"):
        parser.add_argument("--" + key.replace("_", "-"), dest=key)
    for key in ("num_images", "steps", "batch_size", "resolution"):
        parser.add_argument("--" + key.replace("_", "-"), dest=key, type=int)
    parser.add_argument("--guidance", type=float)
    parser.add_argument("--taus", type=float, nargs="+")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--rebuild", action="store_true", help="toy: pretrain the toy LDM instead of the shipped one")
    parser.add_argument("--retrain", action="store_true", help="toy: train GLIGEN instead of the shipped checkpoint")
    args = parser.parse_args(argv)
    if args.config:
        config.update(yaml.safe_load(Path(args.config).read_text()) or {})
    config.update({k: v for k, v in vars(args).items()
                   if v is not None and k not in ("config", "rebuild", "retrain")})
    return config, args.rebuild, args.retrain


def main(argv=None) -> None:
    config, rebuild, retrain = parse_args(argv)
    command = command_line(argv, program="experiments/ablate_beta.py")
    torch.manual_seed(0)
    stages = {}
    toy = config["pretrained"] is None and config["ckpt"] is None
    if toy:
        from gligen.toy.build import ToyBuildConfig, build, ldm_dir, shard_dir
        from gligen.toy.shipped import reference_checkpoint

        world = ToyBuildConfig.from_yaml(config["toy_config"])
        start = time.perf_counter()  # the train shards only when something trains here
        build(config["toy_cache"], world, shipped=not rebuild, train_splits=retrain)
        config["pretrained"] = str(ldm_dir(config["toy_cache"]))
        config["val_shards"] = config["val_shards"] or str(shard_dir(config["toy_cache"], "val", "grounding"))
        shipped = None if retrain else reference_checkpoint(config["train_config"], config["pretrained"])
        if shipped is None:
            build(config["toy_cache"], world, shipped=not rebuild)
        stages["toy_build_s"] = round(time.perf_counter() - start, 1)
        if shipped is not None:
            config["ckpt"] = str(shipped.relative_to(Path.cwd()) if shipped.is_relative_to(Path.cwd()) else shipped)
            print(f"sweeping the shipped reference checkpoint {config['ckpt']} (--retrain trains it here)")
        else:
            start = time.perf_counter()
            config["ckpt"] = str(fit_from_config(config["train_config"]))
            stages["train_s"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    sweep_checkpoint(config)  # gligen/sweep.py: the same sweep every grid cell runs
    stages["sweep_s"] = round(time.perf_counter() - start, 1)
    timings = {"command": command, "git_commit": git_commit(), **stages, "ckpt": config["ckpt"],
               **machine_columns()}
    (Path(config["out"]) / "timings.json").write_text(json.dumps(timings, indent=1) + "\n")
    print(f"wrote {config['out']} ({', '.join(f'{k} {v}' for k, v in stages.items())})")


if __name__ == "__main__":
    main()
