"""COCO instances (2014 and 2017 share the format) -> ``detection`` or ``detection_caption`` shards.

Phrases are the category names; the caption is "" (``detection``) or one COCO caption per image
(``detection_caption``: one chosen per image with ``choose_caption``, or one sample per caption with
``per_caption``). Boxes: COCO ``[x, y, w, h]`` pixels -> normalised xyxy.

``entity_size`` (CLI ``--entity-crops [--entity-size N]``, also used by the MDETR converter) stores each object's box
crop of the image as its entity image ``entity<i>.png`` (padded to a square, resized to N x N; ``--entity-crop
stretch``: stretched to it, as the official crops), for image-entity grounding on real data.
"""

from __future__ import annotations

import argparse
import io
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from gligen.data.convert import (
    ConvertError,
    ConvertReport,
    add_output_arguments,
    choose_caption,
    finish,
    load_json_file,
    normalise_xywh,
    output_kwargs,
    read_image_file,
    sample_key,
    write_converted,
)
from gligen.data.decode import PIL_FORMATS
from gligen.data.schema import SCHEMA_VERSION

ENTITY_SIZE = 224  # CLIP ViT-L/14's input size
# padding colour of the square entity crops: CLIP's mean colour, i.e. zero after CLIP's normalisation
ENTITY_PAD = (123, 117, 104)


@dataclass
class CocoIndex:
    """A COCO-layout JSON grouped by image. ``annotations`` is kept in file order per image."""

    images: dict[Any, dict] = field(default_factory=dict)  # image id -> image entry (id, file_name, width, height)
    annotations: dict[Any, list[dict]] = field(default_factory=dict)  # image id -> its annotation entries
    categories: dict[Any, str] = field(default_factory=dict)  # category id -> name
    captions: dict[Any, list[str]] = field(default_factory=dict)  # image id -> captions, by caption annotation id


def id_order(x: Any) -> tuple:
    """Sort key for ids: numbers numerically, then anything else as text (COCO ids are ints, others vary)."""
    number = isinstance(x, (int, float)) and not isinstance(x, bool)
    return (0, x, "") if number else (1, 0, str(x))


def _positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def index_coco(data: Any, source: str, report: ConvertReport, captions: Any = None) -> CocoIndex:
    """Group a COCO-layout dict by image. Malformed image entries are skipped; annotations of unknown images are
    dropped; both counted in ``report`` with their position in ``source``."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{source}: not a COCO-layout JSON (no 'images' list)")
    index = CocoIndex()
    for i, img in enumerate(data["images"]):
        ok = (isinstance(img, dict) and "id" in img and isinstance(img.get("file_name"), str)
              and _positive_int(img.get("width")) and _positive_int(img.get("height")))
        if not ok:
            report.skip_sample("bad_image_entry", f"{source} images[{i}]", "needs id, file_name, width, height")
            continue
        index.images[img["id"]] = img
    for cat in data.get("categories") or []:
        if isinstance(cat, dict) and "id" in cat and isinstance(cat.get("name"), str):
            index.categories[cat["id"]] = cat["name"]
    for i, ann in enumerate(data.get("annotations") or []):
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if image_id not in index.images:
            report.drop_object("unknown_image_id", f"{source} annotations[{i}]", f"image_id {image_id!r}")
            continue
        index.annotations.setdefault(image_id, []).append(ann)
    if captions is not None:
        entries = captions.get("annotations") if isinstance(captions, dict) else None
        if not isinstance(entries, list):
            raise ValueError(f"{source}: captions JSON has no 'annotations' list")
        for cap in sorted((c for c in entries if isinstance(c, dict)), key=lambda c: id_order(c.get("id"))):
            text = cap.get("caption")
            if cap.get("image_id") in index.images and isinstance(text, str) and text.strip():
                index.captions.setdefault(cap["image_id"], []).append(text.strip())
    return index


def annotation_where(source: str, ann: dict) -> str:
    return f"{source} annotation id {ann.get('id')!r} (image id {ann.get('image_id')!r})"


def usable_annotations(index: CocoIndex, image_id: Any, source: str, report: ConvertReport, keep_crowd: bool
                       ) -> Iterator[tuple[dict, tuple[float, float, float, float]]]:
    """(annotation, normalised box) of the annotations worth keeping; crowd regions (a box around many
    instances) are dropped unless ``keep_crowd``, invalid boxes dropped; all counted."""
    img = index.images[image_id]
    for ann in index.annotations.get(image_id, []):
        if ann.get("iscrowd") and not keep_crowd:
            report.drop_object("crowd", annotation_where(source, ann), "iscrowd=1")
            continue
        try:
            yield ann, normalise_xywh(ann.get("bbox"), img["width"], img["height"])
        except ConvertError as exn:
            report.drop_object(exn.reason, annotation_where(source, ann), str(exn))


def captions_for(index: CocoIndex, image_id: Any, kind: str, per_caption: bool, seed: int) -> list[str]:
    if kind == "detection":
        return [""]
    captions = index.captions.get(image_id, [])
    if not captions or per_caption:
        return captions
    return [choose_caption(captions, image_id, seed)]


def box_pixels(box: list[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Normalised xyxy -> the smallest pixel rectangle (left, top, right, bottom) covering it, at least 1 x 1."""
    eps = 1e-6  # x / W * W is not always exactly x
    left = min(max(math.floor(box[0] * width + eps), 0), width - 1)
    top = min(max(math.floor(box[1] * height + eps), 0), height - 1)
    right = max(min(math.ceil(box[2] * width - eps), width), left + 1)
    bottom = max(min(math.ceil(box[3] * height - eps), height), top + 1)
    return left, top, right, bottom


ENTITY_CROPS = ("pad", "stretch")


def entity_crop(image: Image.Image, box: list[float], size: int, mode: str = "pad") -> Image.Image:
    """The box region of ``image`` (``box_pixels``) as a ``size`` x ``size`` image (bicubic; not resized when it
    already has that size). ``pad`` (default): centred on a square of ``ENTITY_PAD`` colour (padding the shorter
    side; nothing is cut off or stretched); ``stretch``: the region resized to the square as it is, its aspect
    ratio lost (the official GLIGEN crops)."""
    if mode not in ENTITY_CROPS:
        raise ValueError(f"entity crop mode must be one of {ENTITY_CROPS}, got {mode!r}")
    left, top, right, bottom = box_pixels(box, *image.size)
    region = image.convert("RGB").crop((left, top, right, bottom))
    if mode == "stretch":
        return region if region.size == (size, size) else region.resize((size, size), Image.BICUBIC)
    side = max(region.size)
    square = Image.new("RGB", (side, side), ENTITY_PAD)
    square.paste(region, ((side - region.width) // 2, (side - region.height) // 2))
    return square if side == size else square.resize((size, size), Image.BICUBIC)


def add_entity_crops(sample_members: dict, objects: list[dict], data: bytes, size: int, mode: str = "pad"
                     ) -> list[dict]:
    """Crop every object's box out of the encoded image ``data``: adds ``entity<i>.png`` to ``sample_members`` and
    returns the objects with ``entity_image`` set."""
    with Image.open(io.BytesIO(data), formats=list(PIL_FORMATS.values())) as image:  # checked by image_member
        image.load()
        out = []
        for i, obj in enumerate(objects):
            buf = io.BytesIO()
            entity_crop(image, obj["box"], size, mode).save(buf, format="PNG")
            sample_members[f"entity{i}.png"] = buf.getvalue()
            out.append(dict(obj, entity_image=f"entity{i}.png"))
    return out


def image_samples(index: CocoIndex, image_id: Any, images_dir: str, key_prefix: str, kind: str, objects: list[dict],
                  captions: list[str], report: ConvertReport, extra: dict | None = None,
                  entity_size: int | None = None, entity_crop_mode: str = "pad") -> Iterator[dict]:
    """The samples of one image (one per caption) once its objects are known; reads and checks the image file.
    ``entity_size``: also store each object's box crop as its entity image (``entity_crop``, ``entity_crop_mode``)."""
    img = index.images[image_id]
    where = f"{img['file_name']} (image id {image_id!r})"
    if not captions:
        report.skip_sample("no_caption", where, "no caption for a captioned kind")
        return
    try:
        ext, data = read_image_file(os.path.join(images_dir, img["file_name"]), img["width"], img["height"])
    except ConvertError as exn:
        report.skip_sample(exn.reason, where, str(exn))
        return
    entities: dict = {}
    if entity_size is not None:
        objects = add_entity_crops(entities, objects, data, entity_size, entity_crop_mode)
    annotation = {"schema_version": SCHEMA_VERSION, "kind": kind, "source_id": f"{key_prefix}/{image_id}",
                  "width": img["width"], "height": img["height"], "objects": objects, **(extra or {})}
    for k, caption in enumerate(captions):
        suffix = (f"c{k}",) if len(captions) > 1 else ()
        yield {"__key__": sample_key(key_prefix, image_id, *suffix), ext: data, "txt": caption, "json": annotation,
               **entities}


def coco_samples(index: CocoIndex, images_dir: str, report: ConvertReport, source: str, key_prefix: str = "coco",
                 per_caption: bool = False, keep_crowd: bool = False, keep_empty: bool = False, seed: int = 0,
                 limit: int | None = None, entity_size: int | None = None, entity_crop_mode: str = "pad"
                 ) -> Iterator[dict]:
    """Samples of a COCO instances index, images in id order. Kind: ``detection_caption`` when the index has
    captions, else ``detection``. ``entity_size``: store box crops as entity images."""
    kind = "detection_caption" if index.captions else "detection"
    for n, image_id in enumerate(sorted(index.images, key=id_order)):
        if limit is not None and n >= limit:
            return
        objects = []
        for ann, box in usable_annotations(index, image_id, source, report, keep_crowd):
            name = index.categories.get(ann.get("category_id"))
            if name is None:
                report.drop_object("unknown_category", annotation_where(source, ann),
                                   f"category_id {ann.get('category_id')!r}")
                continue
            objects.append({"box": list(box), "phrase": name, "category": name, "entity_image": None})
        if not objects and not keep_empty:
            report.skip_sample("no_objects", f"{index.images[image_id]['file_name']} (image id {image_id!r})",
                               "no usable object annotation")
            continue
        yield from image_samples(index, image_id, images_dir, key_prefix, kind, objects,
                                 captions_for(index, image_id, kind, per_caption, seed), report,
                                 entity_size=entity_size, entity_crop_mode=entity_crop_mode)


def convert_coco(instances: str, images_dir: str, out_dir: str, captions: str | None = None,
                 per_caption: bool = False, keep_crowd: bool = False, keep_empty: bool = False, seed: int = 0,
                 key_prefix: str = "coco", limit: int | None = None, entity_size: int | None = None,
                 entity_crop_mode: str = "pad", **write_kw) -> tuple[dict, ConvertReport]:
    """Convert a COCO instances JSON (+ optional captions JSON) and its image folder; returns (index, report).
    ``entity_size``: store each object's box crop (square, entity_size px) as its entity image."""
    report = ConvertReport(source=instances)
    caption_data = load_json_file(captions) if captions else None
    index = index_coco(load_json_file(instances), instances, report, caption_data)
    samples = coco_samples(index, images_dir, report, instances, key_prefix, per_caption, keep_crowd, keep_empty,
                           seed, limit, entity_size, entity_crop_mode)
    return write_converted(samples, report, out_dir, **write_kw), report


def add_common_coco_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, help="image folder (file_name in the JSON is relative to it)")
    parser.add_argument("--captions", default=None, help="COCO captions JSON: makes detection_caption samples")
    parser.add_argument("--per-caption", action="store_true",
                        help="one sample per caption (default: one caption per image, chosen by --seed)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-image caption choice")
    parser.add_argument("--keep-crowd", action="store_true", help="keep iscrowd=1 annotations (dropped by default)")
    parser.add_argument("--key-prefix", default="coco", help="sample key / source_id prefix")


def add_entity_crop_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--entity-crops", action="store_true",
                        help="store each object's box crop as its entity image entity<i>.png (image entities)")
    parser.add_argument("--entity-size", type=int, default=ENTITY_SIZE,
                        help=f"side of the square entity crops in pixels (default {ENTITY_SIZE})")
    parser.add_argument("--entity-crop", choices=ENTITY_CROPS, default="pad",
                        help="pad: the box centred on a padded square (default); stretch: the box resized to the "
                        "square, aspect ratio lost (official GLIGEN)")


def entity_size_arg(args: argparse.Namespace) -> int | None:
    """The ``entity_size`` converter argument: None unless ``--entity-crops``."""
    if not args.entity_crops:
        return None
    if args.entity_size < 1:
        raise SystemExit(f"--entity-size must be positive, got {args.entity_size}")
    return args.entity_size


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("coco", help="COCO instances JSON (+ captions) -> detection[_caption] shards")
    parser.add_argument("--instances", required=True, help="instances_{train,val}{2014,2017}.json")
    add_common_coco_arguments(parser)
    parser.add_argument("--keep-empty", action="store_true", help="keep images without usable objects")
    add_entity_crop_arguments(parser)
    add_output_arguments(parser, default_prefix="coco")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    index, report = convert_coco(args.instances, args.images, captions=args.captions, per_caption=args.per_caption,
                                 keep_crowd=args.keep_crowd, keep_empty=args.keep_empty, seed=args.seed,
                                 key_prefix=args.key_prefix, limit=args.limit, entity_size=entity_size_arg(args),
                                 entity_crop_mode=args.entity_crop,
                                 **output_kwargs(args))
    return finish(report, index)
