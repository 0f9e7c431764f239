"""Versioned schema of one WebDataset training sample (see docs/data.md).

A sample is a group of tar members sharing a key: ``{key}.{member}``. This module knows which members are allowed
and what the annotation JSON must look like; it never touches tar files (that is ``shards.py``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gligen.constants import NUM_KEYPOINTS

SCHEMA_VERSION = 1
KINDS = ("grounding", "detection", "detection_caption")

IMAGE_MEMBERS = ("jpg", "png", "webp")
CAPTION_MEMBER = "txt"
ANNOTATION_MEMBER = "json"
LATENT_MEMBERS = ("latent_mean.npy", "latent_std.npy", "latent_mean_flip.npy", "latent_std_flip.npy")
EMBED_MEMBERS = ("caption_embeds.npy", "phrase_embeds.npy", "entity_embeds.npy")
ARRAY_MEMBERS = LATENT_MEMBERS + EMBED_MEMBERS
ENTITY_IMAGE_RE = re.compile(r"^entity\d+\.(png|jpg|webp)$")
# Extensions whose standard decoders unpickle (webdataset's default .decode() runs them): never load these.
PICKLE_EXTENSIONS = ("pyd", "pickle", "pkl", "pth", "pt", "npz")

# Sample keys may not contain dots: webdataset splits "key.member" at the first dot of the file name.
KEY_RE = re.compile(r"^[^.]+$")


class SchemaError(ValueError):
    """A sample violates the schema. ``reason`` is a short machine-readable tag used for skip accounting."""

    def __init__(self, reason: str, where: str, field: str, message: str):
        self.reason = reason
        self.where = where
        self.field = field
        super().__init__(f"[{reason}] {where}: {field}: {message}")


@dataclass(frozen=True)
class ObjectAnnotation:
    box: tuple[float, float, float, float]  # normalised xyxy in [0, 1]
    phrase: str
    category: str | None = None
    entity_image: str | None = None  # member name, e.g. "entity0.png"

    def to_json(self) -> dict:
        return {"box": list(self.box), "phrase": self.phrase, "category": self.category,
                "entity_image": self.entity_image}


@dataclass(frozen=True)
class PersonAnnotation:
    keypoints: np.ndarray  # float [17, 3]: normalised x, y and COCO visibility v in {0, 1, 2}
    box: tuple[float, float, float, float] | None = None  # optional person box, normalised xyxy (keypoint_slots)

    def to_json(self) -> dict:
        out: dict = {"keypoints": [[float(x), float(y), int(v)] for x, y, v in self.keypoints]}
        if self.box is not None:
            out["box"] = list(self.box)
        return out


@dataclass(frozen=True)
class Annotation:
    kind: str
    source_id: str
    width: int  # size of the stored image (or of the image the latents encode)
    height: int
    objects: tuple[ObjectAnnotation, ...] = ()
    persons: tuple[PersonAnnotation, ...] | None = None  # None: no person annotation at all
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict:
        out = {"schema_version": self.schema_version, "kind": self.kind, "source_id": self.source_id,
               "width": self.width, "height": self.height, "objects": [o.to_json() for o in self.objects]}
        if self.persons is not None:
            out["persons"] = [p.to_json() for p in self.persons]
        return out


def member_category(member: str, where: str = "?") -> str:
    """Classify a member name (the part after the key's dot): image, caption, annotation, array, entity_image.

    Raises SchemaError "pickle_member" for anything a standard decoder would unpickle and "unknown_member" for
    everything else outside the schema: an unexpected member is damage, not something to guess about.
    """
    last_ext = member.rsplit(".", 1)[-1].lower()
    if last_ext in PICKLE_EXTENSIONS:
        raise SchemaError("pickle_member", where, member, "pickle-bearing member refused (never unpickled)")
    if member in IMAGE_MEMBERS:
        return "image"
    if member == CAPTION_MEMBER:
        return "caption"
    if member == ANNOTATION_MEMBER:
        return "annotation"
    if member in ARRAY_MEMBERS:
        return "array"
    if ENTITY_IMAGE_RE.match(member):
        return "entity_image"
    raise SchemaError("unknown_member", where, member, "member not in schema v1")


def _fail(reason: str, where: str, field: str, message: str):
    raise SchemaError(reason, where, field, message)


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


FLOAT32_MAX = float(np.finfo(np.float32).max)
MAX_SIDE = 2**31 - 1  # width / height must fit an int32


def _float32(x: float, where: str, field: str) -> float:
    """A JSON number as the float it becomes in training (float32); NaN and inf pass (the callers name them).
    Raises ``number_out_of_range`` for finite numbers float32 cannot hold (hundreds of digits, 1e300)."""
    try:
        value = float(x)
    except OverflowError:
        _fail("number_out_of_range", where, field, f"a {x.bit_length()}-bit integer does not fit float32")
    if math.isfinite(value) and abs(value) > FLOAT32_MAX:
        _fail("number_out_of_range", where, field, f"{value!r} does not fit float32")
    return value


def _validate_box(box: Any, where: str, field: str) -> tuple[float, float, float, float]:
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_number(c) for c in box):
        _fail("bad_box", where, field, f"expected 4 numbers, got {box!r}")
    x0, y0, x1, y1 = (_float32(c, where, field) for c in box)
    if not all(math.isfinite(c) for c in (x0, y0, x1, y1)):
        _fail("box_nan", where, field, f"non-finite coordinate in {box!r}")
    if min(x0, y0, x1, y1) < 0.0 or max(x0, y0, x1, y1) > 1.0:
        _fail("box_out_of_range", where, field, f"coordinates must be normalised to [0, 1], got {box!r}")
    if x1 < x0 or y1 < y0:
        _fail("box_inverted", where, field, f"expected x0 <= x1 and y0 <= y1, got {box!r}")
    if x1 == x0 or y1 == y0:
        _fail("box_zero_area", where, field, f"zero-area box {box!r}")
    return (x0, y0, x1, y1)


def _validate_object(obj: Any, where: str, field: str) -> ObjectAnnotation:
    if not isinstance(obj, dict):
        _fail("bad_field", where, field, "object must be a JSON object")
    box = _validate_box(obj.get("box"), where, f"{field}.box")
    phrase = obj.get("phrase")
    if not isinstance(phrase, str) or not phrase.strip():
        _fail("bad_phrase", where, f"{field}.phrase", f"expected a non-empty string, got {phrase!r}")
    category = obj.get("category")
    if category is not None and not isinstance(category, str):
        _fail("bad_field", where, f"{field}.category", f"expected a string or null, got {category!r}")
    entity = obj.get("entity_image")
    if entity is not None and not (isinstance(entity, str) and ENTITY_IMAGE_RE.match(entity)):
        _fail("bad_field", where, f"{field}.entity_image", f"expected 'entity<i>.png|jpg|webp' or null, got {entity!r}")
    return ObjectAnnotation(box=box, phrase=phrase, category=category, entity_image=entity)


def _validate_person(person: Any, where: str, field: str) -> PersonAnnotation:
    kps = person.get("keypoints") if isinstance(person, dict) else None
    if not isinstance(kps, (list, tuple)) or len(kps) != NUM_KEYPOINTS:
        n = len(kps) if isinstance(kps, (list, tuple)) else type(kps).__name__
        _fail("bad_keypoint_count", where, f"{field}.keypoints", f"expected {NUM_KEYPOINTS} keypoints, got {n}")
    for k, kp in enumerate(kps):
        f = f"{field}.keypoints[{k}]"
        if not isinstance(kp, (list, tuple)) or len(kp) != 3 or not all(_number(c) for c in kp):
            _fail("bad_keypoint", where, f, f"expected [x, y, v], got {kp!r}")
        x, y, v = _float32(kp[0], where, f), _float32(kp[1], where, f), kp[2]
        if not (math.isfinite(x) and math.isfinite(y)):
            _fail("bad_keypoint", where, f, f"non-finite coordinate in {kp!r}")
        if v not in (0, 1, 2):
            _fail("bad_keypoint", where, f, f"visibility must be 0, 1 or 2, got {v!r}")
        if v > 0 and not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
            _fail("keypoint_out_of_range", where, f, f"labelled keypoint outside [0, 1]: {kp!r}")
    box = None if person.get("box") is None else _validate_box(person["box"], where, f"{field}.box")
    return PersonAnnotation(keypoints=np.asarray(kps, dtype=np.float32), box=box)


def validate_annotation(obj: Any, where: str) -> Annotation:
    """Check a parsed annotation JSON against schema v1 and return it as an ``Annotation``.

    ``where`` names the sample (shard url and key) in error messages. Raises ``SchemaError``.
    """
    if not isinstance(obj, dict):
        _fail("bad_json", where, "json", f"expected a JSON object, got {type(obj).__name__}")
    version = obj.get("schema_version")
    if version != SCHEMA_VERSION:
        _fail("schema_version", where, "schema_version", f"expected {SCHEMA_VERSION}, got {version!r}")
    kind = obj.get("kind")
    if kind not in KINDS:
        _fail("bad_kind", where, "kind", f"expected one of {KINDS}, got {kind!r}")
    source_id = obj.get("source_id")
    if not isinstance(source_id, str):
        _fail("bad_field", where, "source_id", f"expected a string, got {source_id!r}")
    for name in ("width", "height"):
        value = obj.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            _fail("bad_field", where, name, f"expected a positive integer, got {value!r}")
        if value > MAX_SIDE:
            _fail("number_out_of_range", where, name, f"a {value.bit_length()}-bit size")
    objects = obj.get("objects")
    if not isinstance(objects, list):
        _fail("bad_field", where, "objects", f"expected a list, got {type(objects).__name__}")
    persons = obj.get("persons")
    if persons is not None and not isinstance(persons, list):
        _fail("bad_field", where, "persons", f"expected a list, got {type(persons).__name__}")
    return Annotation(
        kind=kind, source_id=source_id, width=obj["width"], height=obj["height"],
        objects=tuple(_validate_object(o, where, f"objects[{i}]") for i, o in enumerate(objects)),
        persons=None if persons is None else tuple(
            _validate_person(p, where, f"persons[{i}]") for i, p in enumerate(persons)),
    )


@dataclass
class DecodedSample:
    """One sample after safe decoding and validation; input of the transforms."""

    key: str
    url: str
    annotation: Annotation
    caption: str
    image: Any = None  # PIL.Image in RGB, or None when latents stand in for it
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # member name -> array (latents, embeddings)
    entity_images: dict[str, Any] = field(default_factory=dict)  # member name -> PIL.Image
