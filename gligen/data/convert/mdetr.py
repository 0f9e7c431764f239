"""MDETR grounding annotations (Flickr30K Entities, GQA/VG ``final_*.json``) -> ``grounding`` shards.

COCO layout with one image entry per (image, caption): ``images[*].caption``, and annotations whose
``tokens_positive`` ``[[start, end], ...]`` are character spans into that caption; the phrase is their text,
spans joined with a space.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from gligen.data.convert import (
    ConvertError,
    ConvertReport,
    add_output_arguments,
    finish,
    load_json_file,
    output_kwargs,
    phrase_from_spans,
    write_converted,
)
from gligen.data.convert.coco import (
    CocoIndex,
    add_entity_crop_arguments,
    annotation_where,
    entity_size_arg,
    id_order,
    image_samples,
    index_coco,
    usable_annotations,
)


def mdetr_samples(index: CocoIndex, images_dir: str, report: ConvertReport, source: str,
                  key_prefix: str = "mdetr", keep_crowd: bool = False, keep_empty: bool = False,
                  limit: int | None = None, entity_size: int | None = None, entity_crop_mode: str = "pad"
                  ) -> Iterator[dict]:
    for n, image_id in enumerate(sorted(index.images, key=id_order)):
        if limit is not None and n >= limit:
            return
        img = index.images[image_id]
        where = f"{img['file_name']} (image id {image_id!r})"
        caption = img.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            report.skip_sample("no_caption", where, "image entry has no caption")
            continue
        objects = []
        for ann, box in usable_annotations(index, image_id, source, report, keep_crowd):
            try:
                phrase = phrase_from_spans(caption, ann.get("tokens_positive"))
            except ConvertError as exn:
                report.drop_object(exn.reason, annotation_where(source, ann), str(exn))
                continue
            objects.append({"box": list(box), "phrase": phrase, "category": None, "entity_image": None})
        if not objects and not keep_empty:
            report.skip_sample("no_objects", where, "no usable grounded phrase")
            continue
        yield from image_samples(index, image_id, images_dir, key_prefix, "grounding", objects, [caption], report,
                                 entity_size=entity_size, entity_crop_mode=entity_crop_mode)


def convert_mdetr(annotations: str, images_dir: str, out_dir: str, key_prefix: str = "mdetr",
                  keep_crowd: bool = False, keep_empty: bool = False, limit: int | None = None,
                  entity_size: int | None = None, entity_crop_mode: str = "pad", **write_kw
                  ) -> tuple[dict, ConvertReport]:
    report = ConvertReport(source=annotations)
    index = index_coco(load_json_file(annotations), annotations, report)
    samples = mdetr_samples(index, images_dir, report, annotations, key_prefix, keep_crowd, keep_empty, limit,
                           entity_size, entity_crop_mode)
    return write_converted(samples, report, out_dir, **write_kw), report


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("mdetr", help="MDETR grounding JSON (tokens_positive spans) -> grounding shards")
    parser.add_argument("--annotations", required=True, help="e.g. final_flickr_separateGT_train.json")
    parser.add_argument("--images", required=True, help="image folder (file_name is relative to it)")
    parser.add_argument("--keep-crowd", action="store_true", help="keep iscrowd=1 annotations")
    parser.add_argument("--keep-empty", action="store_true", help="keep captions without usable phrases")
    parser.add_argument("--key-prefix", default="mdetr", help="sample key / source_id prefix")
    add_entity_crop_arguments(parser)
    add_output_arguments(parser, default_prefix="mdetr")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    index, report = convert_mdetr(args.annotations, args.images, key_prefix=args.key_prefix,
                                  keep_crowd=args.keep_crowd, keep_empty=args.keep_empty, limit=args.limit,
                                  entity_size=entity_size_arg(args),
                                  entity_crop_mode=args.entity_crop, **output_kwargs(args))
    return finish(report, index)
