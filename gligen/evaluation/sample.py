"""`python -m gligen.evaluation.sample`: one grounded image from a checkpoint and a layout file.

    python -m gligen.evaluation.sample --ckpt runs/toy_box/checkpoints/last.ckpt --layout layout.json \\
        --prompt "a red circle and a blue square" --tau 0.3 --seed 0 --steps 50 --guidance 7.5 --out out.png
    python -m gligen.evaluation.sample --ckpt ... --layout layout.json --preset official   # PLMS, negative prompt

layout.json (normalised coordinates in [0, 1]; the checkpoint's modality says which parts are used):
  box:        {"prompt": "...", "objects": [{"box": [x0, y0, x1, y1], "phrase": "a red circle"}, ...]}
  image:      objects with "entity_image": a reference image path (relative to the layout file) instead of a phrase
              (or "entity_embed": a precomputed feature)
  text_image: objects with a phrase, an entity_image, or both
  keypoint:   {"prompt": "...", "persons": [{"keypoints": [[x, y, v], ... 17 in COCO order]}, ...]} (v = 2: present)
Writes out.png and out_boxes.png (the layout drawn: boxes, keypoints and skeletons).
"""

import argparse
import json
from pathlib import Path

from torchvision.utils import save_image

from gligen.constants import MAX_OBJECTS, MAX_PERSONS
from gligen.evaluation.visualize import draw_layout, layout_label
from gligen.modalities import DEFAULT_MODALITY, get_modality
from gligen.modalities.box import layout_boxes
from gligen.module import GLIGENModule
from gligen.presets import DEFAULT_PRESET, PRESETS, resolve
from gligen.sampling import SAMPLERS, beta_schedule, sample


def read_layout(path: str | Path, max_objects: int = MAX_OBJECTS, modality: str = DEFAULT_MODALITY,
                max_persons: int = MAX_PERSONS) -> dict:
    """Layout JSON -> {"prompt", "layout" (the objects / persons, entity_image paths resolved against the file's
    folder), "boxes" [1, N, 4], "masks" [1, N] (for drawing), "grounding" (the modality's batch keys)}, validated
    for `modality` (`Modality.check_batch(..., user_layout=True)`)."""
    modality = get_modality(modality)
    path = Path(path)
    try:
        layout = json.loads(path.read_text())
        objects = [dict(o) for o in layout.get("objects", [])]
        if len(objects) > max_objects:
            raise ValueError(f"{len(objects)} objects, at most {max_objects}")
        for obj in objects:
            image = obj.get("entity_image")
            if isinstance(image, str) and not Path(image).is_absolute():
                obj["entity_image"] = str(path.parent / image)
            if isinstance(obj.get("entity_image"), str) and not Path(obj["entity_image"]).is_file():
                raise ValueError(f"entity_image {obj['entity_image']} does not exist")
        persons = layout.get("persons") or []
        if len(persons) > max_persons:
            raise ValueError(f"{len(persons)} persons, at most {max_persons}")
        entry = {"objects": objects, "persons": persons}
        boxes, masks, _ = layout_boxes([entry], max_objects)
        batch = {**modality.layouts_batch([entry], max_objects, max_persons), "keys": [str(path)]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path}: bad layout file ({type(error).__name__}: {error})") from None
    modality.check_batch(batch, max_objects, max_persons, user_layout=True)
    return {"prompt": layout.get("prompt", ""), "layout": entry, "boxes": boxes, "masks": masks, "grounding": batch}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gligen.evaluation.sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="GLIGENModule checkpoint (.ckpt)")
    parser.add_argument("--pretrained", help="frozen LDM (default: the one the checkpoint was trained on)")
    parser.add_argument("--layout", required=True, help="layout JSON")
    parser.add_argument("--prompt", help="caption (default: the layout's prompt)")
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=PRESETS,
                        help="paper: DDIM, no negative prompt, tau 0.3; official: PLMS, the official negative "
                        "prompt, alpha_type [0.3, 0, 0.7] (image / text_image [1, 0, 0]); each flag below overrides")
    beta = parser.add_mutually_exclusive_group()
    beta.add_argument("--tau", type=float, default=None, help="grounding for the first fraction tau of the steps")
    beta.add_argument("--alpha-type", type=float, nargs=3, metavar=("A", "B", "C"), help="official [a, b, c]")
    parser.add_argument("--sampler", default=None, choices=sorted(SAMPLERS))
    parser.add_argument("--negative-prompt", default=None, help="caption of the unconditional branch")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out.png")
    args = parser.parse_args(argv)

    module = GLIGENModule.from_checkpoint(args.ckpt, args.pretrained)
    hp = module.hparams
    layout = read_layout(args.layout, hp.max_objects, module.modality, hp.max_persons)
    alpha_type = (args.tau, 0.0, 1.0 - args.tau) if args.tau is not None else args.alpha_type
    chosen = resolve(args.preset, module.modality.name, sampler=args.sampler, negative_prompt=args.negative_prompt,
                     alpha_type=alpha_type)
    betas = beta_schedule(args.steps, tuple(chosen["alpha_type"]))
    grounding = module.modality.layout_inputs(module.ldm, [layout["layout"]], hp.max_objects, hp.max_persons)
    prompt = args.prompt if args.prompt is not None else layout["prompt"]
    image = sample(module.ldm, [prompt], grounding, betas, chosen["sampler"], args.steps, args.guidance, [args.seed],
                   negative_prompt=chosen["negative_prompt"])[0]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(image, out)
    keep = layout["masks"][0].bool()
    labels = [layout_label(o) for o in layout["layout"]["objects"]][: int(keep.sum())]
    upscale = max(1, 256 // image.shape[-1])
    drawn = draw_layout(image.cpu(), layout["boxes"][0][keep], labels, layout["layout"]["persons"], upscale=upscale)
    save_image(drawn.float() / 255, out.with_name(out.stem + "_boxes" + out.suffix))
    print(f"wrote {out} and {out.with_name(out.stem + '_boxes' + out.suffix)}")


if __name__ == "__main__":
    main()
