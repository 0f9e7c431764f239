"""python -m gligen.toy build [--out cache/toy] [--config experiments/configs/toy_world.yaml]"""

import argparse

import torch

from .build import ToyBuildConfig, build


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gligen.toy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build_parser = sub.add_parser("build", help="write toy shards and pretrain the toy LDM (cached)")
    build_parser.add_argument("--out", default="cache/toy")
    build_parser.add_argument("--config", default=None, help="YAML with ToyBuildConfig fields")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    config = ToyBuildConfig.from_yaml(args.config) if args.config else ToyBuildConfig()
    build(args.out, config)


if __name__ == "__main__":
    main()
