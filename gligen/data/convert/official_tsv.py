"""The official GLIGEN TSV (``dataset/tsv_dataset.py``) -> schema-v1 shards.

Each line is ``id<TAB>json``. The JSON holds a base64 image (``image``), ``caption``, ``annos`` (``bbox`` as
``[x, y, w, h]`` pixels, plus ``tokens_positive`` spans into the caption, or a name in ``category_name`` /
``text`` / ``phrase`` / ``name``) and ``is_det`` for detection rows.

Each anno also stores CLIP embeddings (``text_embedding_before/after``, ``image_embedding_before/after``; the
official files hold base64 little-endian float32 strings, other writers plain JSON lists: both are read). With
``image_embeddings="after_reproject"`` the ``image_embedding_after`` of every kept object becomes its
``entity_embeds.npy`` row exactly as official training (``which_layer_image="after_reproject"``) maps it: times the
CLIP text projection's weight (``x @ text_projection.weight``: the official ``project(x, P.T)`` transposes twice),
unit length, times 28.7. Objects without one get a zero row, which the entity modalities read as "no entity image";
every sample of such a run gets the array (zeros throughout when no anno has an embedding), so batches stack. A bad
embedding (not numbers, non-finite, wrong length) skips the sample (``bad_image_embedding``). The text embeddings are
not read: ``precompute`` computes ``phrase_embeds`` from our phrases. Only JSON and base64 are parsed here: nothing
from the file is evaluated or unpickled.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import itertools
import json
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from gligen.constants import CLIP_SUBFOLDER
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
from gligen.nn.tokenizers import IMAGE_FEATURE_NORM, project_image_embeddings

# field names seen across the official TSV writers and loaders, most specific first
IMAGE_FIELDS = ("image", "img")
ANNOS_FIELDS = ("annos", "annotations")
ID_FIELDS = ("data_id", "id")
NAME_FIELDS = ("category_name", "text", "phrase", "name")
IMAGE_EMBEDDING_MODES = ("ignore", "after_reproject")
IMAGE_EMBEDDING_FIELD = "image_embedding_after"
PROBE_ROWS = 16  # rows per file whose embedding lengths are checked against the CLIP before converting


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


# ----------------------------------------------------------------------------------------------- image embeddings
def clip_directory(path: str) -> str:
    """A transformers CLIPModel directory: ``path`` itself, or ``path/clip`` when ``path`` is a pretrained LDM
    directory holding one (as the toy LDM writes it; FrozenLDM's default)."""
    for candidate in (os.path.join(path, CLIP_SUBFOLDER), path):
        config = os.path.join(candidate, "config.json")
        if os.path.isfile(config):
            with open(config) as f:
                if json.load(f).get("model_type") == "clip":
                    return candidate
    raise ValueError(f"--clip {path}: neither a CLIP model directory (config.json of model_type clip) nor an LDM "
                     "directory with one in clip/")


class ReprojectImageEmbeddings:
    """Official ``after_reproject``: CLIP image embeddings [K, projection_dim] -> entity features [K, text width],
    ``project_image_embeddings(x, text_projection.weight, 28.7)``. Loads the CLIP model once (its weights only)."""

    def __init__(self, clip: str):
        from transformers import CLIPModel  # heavy imports, only when the option is on

        self.clip_dir = clip_directory(clip)
        self.weight = CLIPModel.from_pretrained(self.clip_dir).text_projection.weight.detach().float().clone()
        self.in_dim, self.out_dim = self.weight.shape  # Linear(text width -> projection_dim).weight

    def __call__(self, embeddings: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
        return project_image_embeddings(x, self.weight, IMAGE_FEATURE_NORM).numpy().astype(np.float32)


def decode_embedding(value: Any) -> np.ndarray:
    """A stored embedding -> float32 vector: a JSON list of numbers, or (official) base64 of little-endian float32
    bytes. Raises ConvertError ``bad_image_embedding``."""
    if isinstance(value, list):
        if not value or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise ConvertError("bad_image_embedding", "expected a non-empty list of numbers")
        try:
            vec = np.asarray(value, dtype=np.float64)
        except OverflowError:  # an integer beyond float range
            raise ConvertError("bad_image_embedding", "non-finite values") from None
    elif isinstance(value, str):
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exn:
            raise ConvertError("bad_image_embedding", f"neither a list nor valid base64: {exn}") from None
        if not data or len(data) % 4:
            raise ConvertError("bad_image_embedding", f"{len(data)} bytes of base64: not a float32 vector")
        vec = np.frombuffer(data, dtype="<f4")
    else:
        raise ConvertError("bad_image_embedding", f"a {type(value).__name__}, expected a list or base64 float32")
    with np.errstate(over="ignore"):
        vec = vec.astype(np.float32)
    if not np.isfinite(vec).all():
        raise ConvertError("bad_image_embedding", "non-finite values")
    return vec


def entity_rows(annos: list, kept: list[int], mapper: ReprojectImageEmbeddings, row_id: str, where: str,
                report: ConvertReport) -> np.ndarray:
    """``entity_embeds.npy`` [n_kept, text width] float32 of the kept annos (in object order): the mapped
    ``image_embedding_after``, zeros where an anno has none (or an all-zero one). Raises ConvertError
    ``bad_image_embedding`` naming the row id and anno index."""
    rows = np.zeros((len(kept), mapper.out_dim), np.float32)
    slots, vectors = [], []
    for i, j in enumerate(kept):
        value = annos[j].get(IMAGE_EMBEDDING_FIELD)
        if value is None:
            report.note("no_image_embedding", f"{where} annos[{j}]", "no image_embedding_after: zero row")
            continue
        try:
            vec = decode_embedding(value)
        except ConvertError as exn:
            raise ConvertError(exn.reason, f"row id {row_id} annos[{j}] {IMAGE_EMBEDDING_FIELD}: {exn}") from None
        if vec.shape[0] != mapper.in_dim:
            raise ConvertError("bad_image_embedding", f"row id {row_id} annos[{j}] {IMAGE_EMBEDDING_FIELD}: "
                                                      f"{vec.shape[0]} values, the CLIP projects {mapper.in_dim}")
        if not vec.any():
            report.note("zero_image_embedding", f"{where} annos[{j}]", "all-zero image_embedding_after: zero row")
            continue
        slots.append((i, j))
        vectors.append(vec)
    if vectors:
        mapped = mapper(np.stack(vectors))
        for (i, j), row in zip(slots, mapped):
            if not np.isfinite(row).all():  # only when the projection maps the embedding to zero
                raise ConvertError("bad_image_embedding", f"row id {row_id} annos[{j}] {IMAGE_EMBEDDING_FIELD}: "
                                                          "the text projection maps it to zero")
            rows[i] = row
    return rows


def check_embedding_length(paths: list[str], dim: int, clip_dir: str, rows: int = PROBE_ROWS) -> None:
    """Before converting: ValueError when the image embeddings of the first ``rows`` rows of a file all have a
    length other than ``dim`` (the CLIP's projection_dim): a CLIP that does not match the file, not bad rows."""
    for path in paths:
        lengths: Counter[int] = Counter()
        with open(path, "rb") as f:
            for line in itertools.islice(f, rows):
                try:
                    item = json.loads(line.decode("utf-8").split("\t")[-1])
                    annos = _first(item, ANNOS_FIELDS) if isinstance(item, dict) else None
                except (ValueError, RecursionError):
                    continue
                for anno in annos if isinstance(annos, list) else []:
                    try:
                        if isinstance(anno, dict) and anno.get(IMAGE_EMBEDDING_FIELD) is not None:
                            lengths[len(decode_embedding(anno[IMAGE_EMBEDDING_FIELD]))] += 1
                    except ConvertError:
                        continue
        if lengths and dim not in lengths:
            raise ValueError(f"{path}: the first rows' {IMAGE_EMBEDDING_FIELD} have {dict(lengths)} values "
                             f"(length: count), but the CLIP {clip_dir} projects to {dim}: use the CLIP the "
                             "embeddings were made with (official GLIGEN: openai/clip-vit-large-patch14, 768)")


def row_sample(row_id: str, item: Any, where: str, report: ConvertReport, key_prefix: str,
               kind: str | None, mapper: ReprojectImageEmbeddings | None = None) -> dict:
    """One parsed row -> sample dict (with ``entity_embeds.npy`` when ``mapper`` is given). Raises ConvertError for
    a row that cannot give a sample."""
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
    objects, kept = [], []
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
        kept.append(j)
    if not objects:
        raise ConvertError("no_objects", "no usable annotation")
    rows = entity_rows(annos, kept, mapper, row_id, where, report) if mapper is not None else None
    source_id = _first(item, ID_FIELDS) or row_id
    annotation = {"schema_version": SCHEMA_VERSION, "kind": row_kind, "source_id": f"{key_prefix}/{source_id}",
                  "width": width, "height": height, "objects": objects}
    sample = {"__key__": sample_key(key_prefix, source_id), ext: data,
              "txt": "" if row_kind == "detection" else caption, "json": annotation}
    if rows is not None:
        sample["entity_embeds.npy"] = rows
    return sample


def tsv_samples(path: str, report: ConvertReport, key_prefix: str = "tsv", kind: str | None = None,
                limit: int | None = None, mapper: ReprojectImageEmbeddings | None = None) -> Iterator[dict]:
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
                yield row_sample(cols[0], item, where, report, key_prefix, kind, mapper)
            except UnicodeDecodeError as exn:
                report.skip_sample("bad_tsv_row", where, f"not UTF-8: {exn}")
            except ConvertError as exn:
                report.skip_sample(exn.reason, where, str(exn))


def convert_official_tsv(tsv_paths: list[str], out_dir: str, key_prefix: str = "tsv", kind: str | None = None,
                         limit: int | None = None, image_embeddings: str = "ignore", clip: str | None = None,
                         **write_kw) -> tuple[dict, ConvertReport]:
    """Convert TSV files to shards. ``image_embeddings="after_reproject"`` (needs ``clip``: a CLIP model directory
    or an LDM directory with ``clip/``) adds ``entity_embeds.npy`` from the annos' ``image_embedding_after``; a CLIP
    whose projection_dim is not the files' embedding length is a ValueError before anything is written."""
    if image_embeddings not in IMAGE_EMBEDDING_MODES:
        raise ValueError(f"image_embeddings must be one of {IMAGE_EMBEDDING_MODES}, got {image_embeddings!r}")
    mapper = None
    if image_embeddings == "after_reproject":
        if clip is None:
            raise ValueError("image_embeddings='after_reproject' needs clip (--clip): the CLIP model directory, or "
                             "the LDM directory holding it in clip/")
        mapper = ReprojectImageEmbeddings(clip)
        check_embedding_length(tsv_paths, mapper.in_dim, mapper.clip_dir)
    report = ConvertReport(source=",".join(tsv_paths))

    def samples() -> Iterator[dict]:
        for path in tsv_paths:
            yield from tsv_samples(path, report, key_prefix, kind, limit, mapper)

    return write_converted(samples(), report, out_dir, **write_kw), report


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("official_tsv", help="official GLIGEN TSV rows (id, json with base64 image) -> shards")
    parser.add_argument("tsv", nargs="+", help="one or more .tsv files")
    parser.add_argument("--kind", choices=("grounding", "detection", "detection_caption"), default=None,
                        help="force the sample kind (default: detection when the row says is_det, else grounding)")
    parser.add_argument("--key-prefix", default="tsv", help="sample key / source_id prefix")
    parser.add_argument("--image-embeddings", choices=IMAGE_EMBEDDING_MODES, default="ignore",
                        help="after_reproject: each object's stored image_embedding_after, mapped as official "
                             "text+image training does, becomes its entity_embeds.npy row (needs --clip)")
    parser.add_argument("--clip", default=None,
                        help="CLIP model directory whose text projection maps the image embeddings (the CLIP they "
                             "were made with; official: a local openai/clip-vit-large-patch14), or a pretrained LDM "
                             "directory with it in clip/")
    add_output_arguments(parser, default_prefix="tsv")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.image_embeddings != "ignore" and args.clip is None:
        raise SystemExit(f"--image-embeddings {args.image_embeddings} needs --clip DIR")
    index, report = convert_official_tsv(args.tsv, key_prefix=args.key_prefix, kind=args.kind, limit=args.limit,
                                         image_embeddings=args.image_embeddings, clip=args.clip, **output_kwargs(args))
    return finish(report, index)
