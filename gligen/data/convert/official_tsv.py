"""The official GLIGEN TSV (``dataset/tsv_dataset.py``) -> schema-v1 shards.

Each line is ``id<TAB>json``. The JSON holds a base64 image (``image``), ``caption``, ``annos`` (``bbox`` as
``[x, y, w, h]`` pixels, plus ``tokens_positive`` spans into the caption, or a name in ``category_name`` /
``text`` / ``phrase`` / ``name``) and ``is_det`` for detection rows. The per-object CLIP embeddings
(``*_embedding_before/after``) are not read: ``precompute`` makes our own. Only JSON and base64 are parsed here:
nothing from the file is evaluated or unpickled.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
from collections.abc import Iterator
from typing import Any

from gligen.data.convert import (
    ConvertError,
    ConvertReport,
    add_output_arguments,
    finish,
    image_member,
    normalise_xywh,
    output_kwargs,
    phrase_from_spans,
    sample_key,
    write_converted,
)
from gligen.data.schema import SCHEMA_VERSION

# field names seen across the official TSV writers and loaders, most specific first
IMAGE_FIELDS = ("image", "img")
ANNOS_FIELDS = ("annos", "annotations")
ID_FIELDS = ("data_id", "id")
NAME_FIELDS = ("category_name", "text", "phrase", "name")


def _first(item: dict, names: tuple[str, ...]) -> Any:
    return next((item[n] for n in names if item.get(n) is not None), None)


def decode_image_field(value: Any) -> tuple[str, bytes, tuple[int, int]]:
    if not isinstance(value, str):
        raise ConvertError("bad_base64", f"image field is a {type(value).__name__}, expected a base64 string")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exn:
        raise ConvertError("bad_base64", f"image is not valid base64: {exn}") from None
    return image_member(data)


def object_phrase(anno: dict, caption: str, by_name: bool) -> str:
    """Grounding rows name their phrase by caption spans; detection rows (and span-less rows) by a name field."""
    spans = anno.get("tokens_positive")
    if spans and not by_name and caption:
        return phrase_from_spans(caption, spans)
    name = _first(anno, NAME_FIELDS)
    if isinstance(name, str) and name.strip():
        return name.strip()
    raise ConvertError("no_phrase", "annotation has neither tokens_positive nor a name field")


def row_sample(row_id: str, item: Any, where: str, report: ConvertReport, key_prefix: str,
               kind: str | None) -> dict:
    """One parsed row -> sample dict. Raises ConvertError for a row that cannot give a sample."""
    if not isinstance(item, dict):
        raise ConvertError("bad_json_row", f"expected a JSON object, got {type(item).__name__}")
    ext, data, (width, height) = decode_image_field(_first(item, IMAGE_FIELDS))
    is_det = bool(item.get("is_det", False))
    caption = item.get("caption") if isinstance(item.get("caption"), str) else ""
    row_kind = kind or ("detection" if is_det else "grounding")
    if row_kind != "detection" and not caption.strip():
        raise ConvertError("no_caption", f"kind {row_kind} needs a caption")
    annos = _first(item, ANNOS_FIELDS)
    if not isinstance(annos, list):
        raise ConvertError("bad_json_row", "no 'annos' list")
    objects = []
    for j, anno in enumerate(annos):
        try:
            if not isinstance(anno, dict):
                raise ConvertError("bad_annotation", f"expected an object, got {type(anno).__name__}")
            box = normalise_xywh(anno.get("bbox"), width, height)
            phrase = object_phrase(anno, caption, is_det or row_kind != "grounding")
        except ConvertError as exn:
            report.drop_object(exn.reason, f"{where} annos[{j}]", str(exn))
            continue
        category = anno.get("category_name") if isinstance(anno.get("category_name"), str) else None
        objects.append({"box": list(box), "phrase": phrase, "category": category, "entity_image": None})
    if not objects:
        raise ConvertError("no_objects", "no usable annotation")
    source_id = _first(item, ID_FIELDS) or row_id
    annotation = {"schema_version": SCHEMA_VERSION, "kind": row_kind, "source_id": f"{key_prefix}/{source_id}",
                  "width": width, "height": height, "objects": objects}
    return {"__key__": sample_key(key_prefix, source_id), ext: data,
            "txt": "" if row_kind == "detection" else caption, "json": annotation}


def tsv_samples(path: str, report: ConvertReport, key_prefix: str = "tsv", kind: str | None = None,
                limit: int | None = None) -> Iterator[dict]:
    """Samples of a TSV file; bad rows are counted and named by their 1-based line number."""
    with open(path, "rb") as f:  # bytes: a row with invalid UTF-8 is one bad row, not a crashed run
        for line_no, line in enumerate(f, start=1):
            if limit is not None and line_no > limit:
                return
            where = f"{path} row {line_no}"
            try:
                text = line.decode("utf-8").rstrip("\r\n")
                if not text.strip():
                    continue
                cols = text.split("\t")
                if len(cols) < 2:
                    raise ConvertError("bad_tsv_row", f"expected 'id<TAB>json', got {len(cols)} column(s)")
                try:
                    item = json.loads(cols[-1])
                except ValueError as exn:
                    raise ConvertError("bad_json_row", f"JSON does not parse: {exn}") from None
                yield row_sample(cols[0], item, where, report, key_prefix, kind)
            except UnicodeDecodeError as exn:
                report.skip_sample("bad_tsv_row", where, f"not UTF-8: {exn}")
            except ConvertError as exn:
                report.skip_sample(exn.reason, where, str(exn))


def convert_official_tsv(tsv_paths: list[str], out_dir: str, key_prefix: str = "tsv", kind: str | None = None,
                         limit: int | None = None, **write_kw) -> tuple[dict, ConvertReport]:
    report = ConvertReport(source=",".join(tsv_paths))

    def samples() -> Iterator[dict]:
        for path in tsv_paths:
            yield from tsv_samples(path, report, key_prefix, kind, limit)

    return write_converted(samples(), report, out_dir, **write_kw), report


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("official_tsv", help="official GLIGEN TSV rows (id, json with base64 image) -> shards")
    parser.add_argument("tsv", nargs="+", help="one or more .tsv files")
    parser.add_argument("--kind", choices=("grounding", "detection", "detection_caption"), default=None,
                        help="force the sample kind (default: detection when the row says is_det, else grounding)")
    parser.add_argument("--key-prefix", default="tsv", help="sample key / source_id prefix")
    add_output_arguments(parser, default_prefix="tsv")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    index, report = convert_official_tsv(args.tsv, key_prefix=args.key_prefix, kind=args.kind, limit=args.limit,
                                         **output_kwargs(args))
    return finish(report, index)
