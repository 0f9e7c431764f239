"""python -m gligen.data {convert FORMAT, precompute, inspect} ... (see docs/data.md)."""

from __future__ import annotations

import argparse
import logging
import sys

from gligen.data import inspect as inspect_cmd
from gligen.data.convert import coco, keypoints, mdetr, official_tsv, precompute


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gligen.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="public annotation formats -> schema-v1 shards")
    formats = convert.add_subparsers(dest="format", required=True)
    for module in (coco, keypoints, mdetr, official_tsv):
        module.register(formats)
    precompute.register(sub)
    inspect_cmd.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
