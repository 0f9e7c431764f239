"""`python -m gligen.sample`: one grounded image from a checkpoint and a layout file.

    python -m gligen.sample --ckpt runs/toy_box/checkpoints/last.ckpt --layout layout.json \\
        --prompt "a red circle and a blue square" --tau 0.3 --seed 0 --steps 50 --guidance 7.5 --out out.png

layout.json: {"prompt": "...", "objects": [{"box": [x0, y0, x1, y1], "phrase": "a red circle"}, ...]} with boxes
normalised xyxy in [0, 1] (the objects part of the data schema). Writes out.png and out_boxes.png (boxes drawn).
"""

import argparse
import json
from pathlib import Path

from torchvision.utils import save_image

from .evaluation import layout_tensors
from .module import GLIGENModule
from .nn.tokenizers import MAX_OBJECTS, check_box_grounding
from .sampling import SAMPLERS, beta_schedule, sample, tau_schedule
from .visualize import draw_boxes


def read_layout(path: str | Path, max_objects: int = MAX_OBJECTS) -> dict:
    """Layout JSON -> {"prompt", "boxes" [1, N, 4], "masks" [1, N], "phrases" [[...]]}, validated."""
    try:
        layout = json.loads(Path(path).read_text())
        if len(layout.get("objects", [])) > max_objects:
            raise ValueError(f"{len(layout['objects'])} objects, at most {max_objects}")
        boxes, masks, phrases = layout_tensors([{"objects": layout.get("objects", [])}], max_objects)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path}: bad layout file ({type(error).__name__}: {error})") from None
    check_box_grounding(boxes, masks, phrases, keys=[str(path)], max_objects=max_objects)
    return {"prompt": layout.get("prompt", ""), "boxes": boxes, "masks": masks, "phrases": phrases}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="GLIGENModule checkpoint (.ckpt)")
    parser.add_argument("--pretrained", help="frozen LDM (default: the one the checkpoint was trained on)")
    parser.add_argument("--layout", required=True, help="layout JSON")
    parser.add_argument("--prompt", help="caption (default: the layout's prompt)")
    beta = parser.add_mutually_exclusive_group()
    beta.add_argument("--tau", type=float, default=None, help="grounding for the first fraction tau of the steps")
    beta.add_argument("--alpha-type", type=float, nargs=3, metavar=("A", "B", "C"), help="official [a, b, c]")
    parser.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out.png")
    args = parser.parse_args(argv)

    module = GLIGENModule.from_checkpoint(args.ckpt, args.pretrained)
    layout = read_layout(args.layout, module.hparams.max_objects)
    if args.alpha_type:
        betas = beta_schedule(args.steps, tuple(args.alpha_type))
    else:
        betas = tau_schedule(args.steps, 0.3 if args.tau is None else args.tau)  # official box default
    grounding = {
        "boxes": layout["boxes"],
        "masks": layout["masks"],
        "positive_embeddings": module.ldm.encode_phrases(layout["phrases"]),
    }
    prompt = args.prompt if args.prompt is not None else layout["prompt"]
    image = sample(module.ldm, [prompt], grounding, betas, args.sampler, args.steps, args.guidance, [args.seed])[0]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(image, out)
    keep = layout["masks"][0].bool()
    labels = [p for p, k in zip(layout["phrases"][0], keep.tolist()) if k]
    upscale = max(1, 256 // image.shape[-1])
    drawn = draw_boxes(image, layout["boxes"][0][keep], labels, upscale=upscale)
    save_image(drawn.float() / 255, out.with_name(out.stem + "_boxes" + out.suffix))
    print(f"wrote {out} and {out.with_name(out.stem + '_boxes' + out.suffix)}")


if __name__ == "__main__":
    main()
