"""python -m gligen.toy build [--out cache/toy] [--config experiments/configs/toy_world.yaml] [--rebuild]
python -m gligen.toy evaluate [--cache cache/toy] [--ckpt runs/toy_box/checkpoints/last.ckpt] [--out results/toy]
python -m gligen.toy ship --cache cache/toy --ckpt runs/toy_box/checkpoints/last.ckpt   (replace gligen/toy/shipped)
python -m gligen.toy ship-seed --ckpt runs/toy_box_seed1/checkpoints/last.ckpt   (the same training, another seed)
python -m gligen.toy probe-base --ldm cache/toy/ldm --config WORLD.yaml --out probe.json   (UNet only: shapes drawn?)

Without --config, build builds the toy world every experiment uses (ToyBuildConfig's defaults, spelled out in
experiments/configs/toy_world.yaml; tests/toy/test_shipped.py checks they agree)."""

import argparse
import json

from gligen.evaluation.reporting import command_line
from gligen.toy import shipped
from gligen.toy.build import build, build_config
from gligen.toy.probe import probe_base, write_probe
from gligen.toy.report import evaluate_toy, write_report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gligen.toy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build_parser = sub.add_parser("build", help="write toy shards and pretrain the toy LDM (cached)")
    build_parser.add_argument("--out", default="cache/toy")
    build_parser.add_argument("--config", default=None, help="YAML with ToyBuildConfig fields (default: the toy "
                              "world of experiments/configs/toy_world.yaml)")
    build_parser.add_argument("--rebuild", action="store_true",
                              help="pretrain the LDM here instead of copying the shipped one")
    evaluate_parser = sub.add_parser("evaluate", help="measure evaluators, VAE, base LDM (+ a checkpoint)")
    evaluate_parser.add_argument("--cache", default="cache/toy")
    evaluate_parser.add_argument("--ckpt", default=None, help="a box-grounded GLIGEN checkpoint to score too")
    evaluate_parser.add_argument("--num-images", type=int, default=200)
    evaluate_parser.add_argument("--out", default="results/toy")
    ship_parser = sub.add_parser("ship", help="replace the shipped LDM + reference checkpoint (gligen/toy/shipped)")
    ship_parser.add_argument("--cache", default="cache/toy")
    ship_parser.add_argument("--ckpt", default="runs/toy_box/checkpoints/last.ckpt")
    ship_parser.add_argument("--train-config", nargs="+", default=shipped.TRAIN_CONFIG,
                             help="the training config the checkpoint was trained by (files composed in order)")
    ship_parser.add_argument("--trained-at", default=None, help="commit the checkpoint was trained at (default: now)")
    seed_parser = sub.add_parser("ship-seed", help="ship the reference training with another seed next to it")
    seed_parser.add_argument("--ckpt", required=True, help="runs/toy_box_seed<s>/checkpoints/last.ckpt")
    probe_parser = sub.add_parser("probe-base", help="pretrain only a UNet for a world config on a built LDM's VAE "
                                  "and text encoder; measure the shapes it draws (gligen/toy/probe.py)")
    probe_parser.add_argument("--ldm", required=True, help="a built toy LDM (its VAE and text encoder are kept)")
    probe_parser.add_argument("--config", default=None, help="the world to probe (ToyBuildConfig YAML)")
    probe_parser.add_argument("--num-images", type=int, default=16000)
    probe_parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    if args.command == "build":
        build(args.out, build_config(args.config), shipped=not args.rebuild)
    elif args.command == "probe-base":
        command = None if argv is None else command_line(argv, "-m gligen.toy")
        write_probe(probe_base(args.ldm, build_config(args.config), args.num_images, command=command), args.out)
    elif args.command == "ship-seed":
        print(json.dumps(shipped.ship_seed(args.ckpt)["seed_checkpoints"], indent=1))
    elif args.command == "ship":
        record = shipped.ship(args.cache, args.ckpt, args.train_config, trained_at=args.trained_at)
        print(json.dumps(record, indent=1))
    else:
        write_report(evaluate_toy(args.cache, args.ckpt, args.num_images), args.out)


if __name__ == "__main__":
    main()
