"""`python -m gligen.convert`: move GLIGEN weights between this project, diffusers and the official code.

    # a GLIGENModule checkpoint -> a directory StableDiffusionGLIGENPipeline.from_pretrained loads
    python -m gligen.convert to-diffusers runs/box/checkpoints/last.ckpt exported/ [--pretrained SD_DIR]

    # an official GLIGEN .pth -> imported/pretrained/ (diffusers SD layout) + imported/gligen.ckpt (GLIGENModule)
    python -m gligen.convert from-official gligen-generation-text-box.pth imported/ [--base SD_DIR_OR_HUB_ID]

The official file holds no tokenizer or component configs: `--base` (a diffusers SD-1.x directory or hub id, default
CompVis/stable-diffusion-v1-4) supplies the architecture, tokenizer and scheduler; all weights come from the file.
Official files whose `config_dict` is pickled OmegaConf are refused (see the message for the safe workaround).
"""

import argparse
import sys

from .interop import export_to_diffusers, import_official


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    to_diffusers = commands.add_parser("to-diffusers", help="GLIGENModule checkpoint -> diffusers GLIGEN pipeline")
    to_diffusers.add_argument("ckpt", help="GLIGENModule checkpoint (.ckpt)")
    to_diffusers.add_argument("out", help="output directory")
    to_diffusers.add_argument("--pretrained", help="frozen LDM (default: the one recorded in the checkpoint)")
    from_official = commands.add_parser("from-official", help="official GLIGEN .pth -> pretrained dir + .ckpt")
    from_official.add_argument("ckpt", help="official GLIGEN checkpoint (.pth)")
    from_official.add_argument("out", help="output directory (gets pretrained/ and gligen.ckpt)")
    from_official.add_argument(
        "--base", default="CompVis/stable-diffusion-v1-4", help="diffusers SD-1.x dir or hub id: configs, tokenizer"
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "to-diffusers":
            out = export_to_diffusers(args.ckpt, args.out, args.pretrained)
            print(f"wrote {out} (load with StableDiffusionGLIGENPipeline.from_pretrained)")
        else:
            pretrained, ckpt = import_official(args.ckpt, args.out, args.base)
            print(f"wrote {pretrained} (frozen LDM) and {ckpt} (GLIGENModule checkpoint)")
    except (ValueError, OSError) as error:  # refused checkpoint, missing file or base: a message, not a traceback
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
