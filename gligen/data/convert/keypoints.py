"""COCO person keypoints (``person_keypoints_*.json``) -> shards with ``persons`` and person boxes.

Each person gives an object (its box, phrase "person") and, when it has at least ``min_keypoints`` labelled
keypoints, a ``persons`` entry: 17 ``[x / width, y / height, v]`` with COCO visibility v kept (0 unlabelled,
1 labelled hidden, 2 visible), and its box (the official data fills the person slots with the largest boxes).
Caption: "" (``detection``) or a COCO caption (``detection_caption``).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

from gligen.constants import NUM_KEYPOINTS
from gligen.data.convert import (
    ConvertError,
    ConvertReport,
    add_output_arguments,
    finish,
    load_json_file,
    output_kwargs,
    write_converted,
)
from gligen.data.convert.coco import (
    CocoIndex,
    add_common_coco_arguments,
    annotation_where,
    captions_for,
    id_order,
    image_samples,
    index_coco,
    usable_annotations,
)


def normalise_keypoints(flat: Any, width: int, height: int) -> tuple[list[list[float]], bool]:
    """COCO ``[x1, y1, v1, ..., x17, y17, v17]`` pixels -> 17 ``[x, y, v]`` normalised.

    Unlabelled points (v = 0) get coordinates 0 (COCO stores 0 there too). Labelled points a fraction of a pixel
    outside the image are clipped; returns (keypoints, whether any was clipped). Raises ConvertError
    ``bad_keypoints``."""
    if (not isinstance(flat, list) or len(flat) != 3 * NUM_KEYPOINTS
            or not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in flat)):
        raise ConvertError("bad_keypoints", f"expected {3 * NUM_KEYPOINTS} numbers")
    out, clipped = [], False
    for k in range(NUM_KEYPOINTS):
        x, y, v = flat[3 * k: 3 * k + 3]
        if v not in (0, 1, 2) or not all(abs(c) < float("inf") for c in (x, y)):
            raise ConvertError("bad_keypoints", f"keypoint {k}: [{x}, {y}, {v}]")
        if v == 0:
            out.append([0.0, 0.0, 0])
            continue
        nx, ny = x / width, y / height
        cx, cy = min(max(nx, 0.0), 1.0), min(max(ny, 0.0), 1.0)
        clipped |= (cx, cy) != (nx, ny)
        out.append([cx, cy, int(v)])
    return out, clipped


def keypoint_samples(index: CocoIndex, images_dir: str, report: ConvertReport, source: str,
                     key_prefix: str = "cocokp", per_caption: bool = False, keep_crowd: bool = False,
                     min_keypoints: int = 1, seed: int = 0, limit: int | None = None) -> Iterator[dict]:
    """Samples of the images with at least one person box, in image id order."""
    kind = "detection_caption" if index.captions else "detection"
    for n, image_id in enumerate(sorted(index.images, key=id_order)):
        if limit is not None and n >= limit:
            return
        img = index.images[image_id]
        objects, persons = [], []
        for ann, box in usable_annotations(index, image_id, source, report, keep_crowd):
            objects.append({"box": list(box), "phrase": "person", "category": "person", "entity_image": None})
            if "keypoints" not in ann:
                continue
            try:
                keypoints, clipped = normalise_keypoints(ann["keypoints"], img["width"], img["height"])
            except ConvertError as exn:
                report.drop_object(exn.reason, annotation_where(source, ann), str(exn))
                continue
            if sum(v > 0 for _, _, v in keypoints) < min_keypoints:
                continue
            if clipped:  # kept, but worth knowing about
                report.note("keypoint_clipped", annotation_where(source, ann),
                            "labelled keypoint outside the image, clipped to it")
            persons.append({"keypoints": keypoints, "box": list(box)})  # the box: keypoint_slots "largest"
        if not objects:
            report.skip_sample("no_persons", f"{img['file_name']} (image id {image_id!r})", "no usable person")
            continue
        yield from image_samples(index, image_id, images_dir, key_prefix, kind, objects,
                                 captions_for(index, image_id, kind, per_caption, seed), report,
                                 extra={"persons": persons})


def convert_keypoints(keypoints_json: str, images_dir: str, out_dir: str, captions: str | None = None,
                      per_caption: bool = False, keep_crowd: bool = False, min_keypoints: int = 1, seed: int = 0,
                      key_prefix: str = "cocokp", limit: int | None = None, **write_kw) -> tuple[dict, ConvertReport]:
    report = ConvertReport(source=keypoints_json)
    caption_data = load_json_file(captions) if captions else None
    index = index_coco(load_json_file(keypoints_json), keypoints_json, report, caption_data)
    samples = keypoint_samples(index, images_dir, report, keypoints_json, key_prefix, per_caption, keep_crowd,
                               min_keypoints, seed, limit)
    return write_converted(samples, report, out_dir, **write_kw), report


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("keypoints", help="COCO person keypoints JSON -> shards with persons")
    parser.add_argument("--keypoints", required=True, help="person_keypoints_{train,val}2017.json")
    add_common_coco_arguments(parser)
    parser.set_defaults(key_prefix="cocokp")
    parser.add_argument("--min-keypoints", type=int, default=1,
                        help="labelled keypoints a person needs to enter 'persons' (its box is kept regardless)")
    add_output_arguments(parser, default_prefix="cocokp")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    index, report = convert_keypoints(args.keypoints, args.images, captions=args.captions,
                                      per_caption=args.per_caption, keep_crowd=args.keep_crowd,
                                      min_keypoints=args.min_keypoints, seed=args.seed, key_prefix=args.key_prefix,
                                      limit=args.limit, **output_kwargs(args))
    return finish(report, index)
