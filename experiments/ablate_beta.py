"""Scheduled-sampling sweep: grounding accuracy and image quality against tau (beta = 1 for the first tau of steps).

    python experiments/ablate_beta.py                       # toy world: builds what is missing, then sweeps
    python experiments/ablate_beta.py --pretrained runwayml/stable-diffusion-v1-5 --ckpt my.ckpt \\
        --val-shards data/coco2014val --detector my/detr-dir --resolution 512 --steps 50 --guidance 7.5

Writes <out>/metrics.csv (one row per tau x seed, with git commit and config hash), summary.md (mean +- std per
tau), ap_fid_vs_tau.png, samples_tau<tau>.png grids with the layout drawn, and TensorBoard events in
<out>/tensorboard (sample grids, HParams with hp/ metrics).
"""

import argparse
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing too

from gligen.cli import fit_from_config
from gligen.sweep import sweep_checkpoint

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
    args = parser.parse_args(argv)
    if args.config:
        config.update(yaml.safe_load(Path(args.config).read_text()) or {})
    config.update({k: v for k, v in vars(args).items() if v is not None and k != "config"})
    return config


def main(argv=None) -> None:
    config = parse_args(argv)
    torch.manual_seed(0)
    toy = config["pretrained"] is None and config["ckpt"] is None
    if toy:
        from gligen.toy.build import ToyBuildConfig, build, ldm_dir, shard_dir

        build(config["toy_cache"], ToyBuildConfig.from_yaml(config["toy_config"]))
        config["pretrained"] = str(ldm_dir(config["toy_cache"]))
        config["val_shards"] = config["val_shards"] or str(shard_dir(config["toy_cache"], "val", "grounding"))
        config["ckpt"] = str(fit_from_config(config["train_config"]))
    sweep_checkpoint(config)  # gligen/sweep.py: the same sweep every grid cell runs
    print(f"wrote {config['out']}")


if __name__ == "__main__":
    main()
