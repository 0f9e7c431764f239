"""`python -m gligen.interop`: move GLIGEN weights between this project, diffusers and the official code.

    # a GLIGENModule checkpoint -> a directory diffusers loads: box -> StableDiffusionGLIGENPipeline,
    # text_image / image -> StableDiffusionGLIGENTextImagePipeline (image tower from <pretrained>/clip);
    # keypoint -> exported/pretrained/ + exported/gligen.ckpt (no diffusers keypoint pipeline exists)
    python -m gligen.interop to-diffusers runs/box/checkpoints/last.ckpt exported/ [--pretrained SD_DIR]

    # an official GLIGEN .pth (box, text-image or keypoint) -> imported/pretrained/ (diffusers SD layout) +
    # imported/gligen.ckpt (GLIGENModule with the variant's modality)
    python -m gligen.interop from-official gligen-generation-text-box.pth imported/ [--base SD_DIR_OR_HUB_ID]
    python -m gligen.interop from-official gligen-generation-text-image-box.pth imported/ --clip CLIP_DIR

The official file holds no tokenizer or component configs: `--base` (a diffusers SD-1.x directory or hub id, default
CompVis/stable-diffusion-v1-4) supplies the architecture, tokenizer and scheduler; all weights come from the file.
The variant is told by the position_net keys; the file's OmegaConf `config_dict` is read as plain data through inert
stand-ins (torch.load weights_only=True, nothing unpickled as code) and cross-checks it. Text-image models need
CLIP's image tower for image entities (`--clip`, a transformers CLIPModel; SD-1.x: openai/clip-vit-large-patch14).
"""

import argparse
import sys

import torch

from gligen.interop import export_to_diffusers, import_official
from gligen.modalities import get_modality


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gligen.interop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
    from_official.add_argument(
        "--clip", help="text-image models: CLIPModel dir or hub id for image entities (default <base>/clip if any)"
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "to-diffusers":
            out = export_to_diffusers(args.ckpt, args.out, args.pretrained)
            if (out / "gligen.ckpt").is_file():
                print(f"wrote {out}/pretrained and {out}/gligen.ckpt: diffusers has no keypoint pipeline; load with "
                      f"GLIGENModule.from_checkpoint('{out}/gligen.ckpt') (its .ldm.unet is a diffusers UNet)")
            else:
                pipeline = "TextImage" if (out / "image_encoder").is_dir() else ""
                print(f"wrote {out} (load with StableDiffusionGLIGEN{pipeline}Pipeline.from_pretrained)")
        else:
            pretrained, ckpt = import_official(args.ckpt, args.out, args.base, args.clip)
            info = torch.load(ckpt, map_location="cpu", weights_only=True)["gligen"]["official"]
            print(f"wrote {pretrained} (frozen LDM) and {ckpt} (GLIGENModule checkpoint, modality "
                  f"{info['modality']}); variant from the position_net keys; config: {info['config']}")
            if get_modality(info["modality"]).entity_images and info["clip"] is None:
                print("note: no CLIP image tower was given (--clip): image entities need one in pretrained/clip")
    except (ValueError, OSError) as error:  # refused checkpoint, missing file or base: a message, not a traceback
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
