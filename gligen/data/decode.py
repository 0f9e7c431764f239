"""Decoding one sample safely: limits on what a member may be (`DataLimits`), the skip accounting every reader
shares (`SkipCounter`, `DamagedSampleError`), and the explicit per-extension decoders (PIL after a full ``load()``,
json with a depth limit, utf-8, ``numpy.load(allow_pickle=False)``): anything else is damage, never unpickled."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from gligen.data.schema import (
    ANNOTATION_MEMBER,
    CAPTION_MEMBER,
    FLOAT32_MAX,
    KEY_RE,
    Annotation,
    DecodedSample,
    SchemaError,
    member_category,
    validate_annotation,
)

log = logging.getLogger(__name__)

CAPTION_EMBED_TOKENS = 77
# Only these decoders may run on shard bytes (PIL otherwise tries every registered plugin).
PIL_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
# A member larger than this is not read into memory (a damaged or hostile header could claim gigabytes).
MAX_MEMBER_BYTES = 512 * 2**20
# Image modes converted to RGB on decoding (CMYK, palette, grey, alpha: 8 bits per channel, one meaning of RGB);
# 16/32-bit integer and float modes ("I;16", "I", "F") are skipped as unsupported_image_mode: how their range maps
# to 8 bits (12-bit data in 16-bit containers, HDR floats) is not knowable from the file.
RGB_CONVERTIBLE_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"})


@dataclass(frozen=True)
class DataLimits:
    """Per-sample resource limits of the reader; a sample over one is a counted skip with the reason in brackets.

    - ``max_member_bytes`` (member_too_large): a member is not even read into memory beyond it.
    - ``max_sample_bytes`` (sample_too_large): all members of one sample together.
    - ``max_image_pixels`` (image_too_large) and ``max_aspect_ratio`` (extreme_aspect): checked from the image
      header before decoding, and for the annotation's width x height (the short-side resize of a 1 x 100000
      image would allocate ~26 G pixels).
    - ``max_json_bytes`` (json_too_large) and ``max_json_depth`` (json_too_deep; counted before parsing, the
      parser would otherwise recurse).
    - ``max_compression_ratio`` over ``compression_check_bytes`` (compression_bomb): a compressed shard
      (.tar.gz/.bz2/.xz) that inflates more than this once that many bytes came out is abandoned (gzip bombs).
    """

    max_member_bytes: int = MAX_MEMBER_BYTES
    max_sample_bytes: int = 1024 * 2**20
    max_image_pixels: int = 64 * 2**20
    max_aspect_ratio: float = 20.0
    max_json_bytes: int = 2**20
    max_json_depth: int = 32
    max_compression_ratio: float = 100.0
    compression_check_bytes: int = 32 * 2**20

    @classmethod
    def of(cls, limits: DataLimits | Mapping[str, Any] | None) -> DataLimits:
        """``limits`` as a ``DataLimits``: None gives the defaults, a mapping overrides some (unknown names fail)."""
        if limits is None:
            return DEFAULT_LIMITS
        if isinstance(limits, DataLimits):
            return limits
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = set(limits) - set(known)
        if unknown:
            raise ValueError(f"unknown data limits {sorted(unknown)}; known: {known}")
        return cls(**limits)


DEFAULT_LIMITS = DataLimits()


# ----------------------------------------------------------------------------------------------- skip accounting
class DamagedSampleError(RuntimeError):
    """Raised in strict mode instead of skipping; names the shard and the sample key."""

    def __init__(self, reason: str, url: str, key: str | None, message: str):
        self.reason, self.url, self.key = reason, url, key
        super().__init__(f"damaged sample ({reason}) in shard {url}, key {key}: {message}")


class SkipCounter:
    """Per-reason counts of skipped samples (``counts``) and of objects / persons dropped from kept samples
    (``dropped``: cap, area filter, outside the crop). Logs the first skip of each reason (with shard url and key);
    in strict mode a skip raises ``DamagedSampleError`` instead (drops are normal data handling, never raised)."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.counts: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.accepted = 0

    def record(self, reason: str, url: str, key: str | None, message: str) -> None:
        if self.strict:
            raise DamagedSampleError(reason, url, key, message)
        if reason not in self.counts:
            log.warning("skipping damaged sample (%s) in shard %s, key %s: %s (further '%s' skips are only counted)",
                        reason, url, key, message, reason)
        self.counts[reason] += 1

    def merge(self, counts: Mapping[str, int]) -> None:
        self.counts.update(counts)

    def state(self) -> dict:
        """Everything counted so far: ``{"skipped": {...}, "dropped": {...}, "accepted": n}`` (copies)."""
        return {"skipped": Counter(self.counts), "dropped": Counter(self.dropped), "accepted": self.accepted}

    def since(self, state: Mapping[str, Any]) -> dict:
        """What was counted after ``state`` (an earlier ``state()``), as plain dicts (a worker's batch payload)."""
        return {"skipped": dict(self.counts - state["skipped"]), "dropped": dict(self.dropped - state["dropped"]),
                "accepted": self.accepted - state["accepted"]}

    def merge_state(self, delta: Mapping[str, Any]) -> None:
        """Add a ``since()`` payload (from a DataLoader worker)."""
        self.counts.update(delta.get("skipped", {}))
        self.dropped.update(delta.get("dropped", {}))
        self.accepted += delta.get("accepted", 0)

    def summary(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


# -------------------------------------------------------------------------------------------------- decoding
def open_image(data: bytes, formats: Iterable[str], limits: DataLimits, where: str, member: str) -> Image.Image:
    """Open encoded image bytes with only the given PIL ``formats`` and check the header (size, aspect ratio, mode)
    against ``limits`` before anything is decoded. Raises SchemaError ``bad_image``, ``image_too_large``,
    ``extreme_aspect`` or ``unsupported_image_mode``. The image is not loaded yet: see ``load_rgb``."""
    try:
        img = Image.open(io.BytesIO(data), formats=list(formats))
    except Image.DecompressionBombError as exn:  # PIL's own header check (above twice its MAX_IMAGE_PIXELS)
        raise SchemaError("image_too_large", where, member, str(exn)) from None
    except Exception as exn:  # PIL raises many types (OSError, SyntaxError, UnidentifiedImageError, ...)
        raise SchemaError("bad_image", where, member, f"cannot decode image: {exn}") from None
    width, height = img.size
    if min(width, height) <= 0:
        raise SchemaError("bad_image", where, member, f"image size {img.size}")
    check_image_size(width, height, limits, where, member)
    if img.mode not in RGB_CONVERTIBLE_MODES:
        raise SchemaError("unsupported_image_mode", where, member,
                          f"mode {img.mode!r}; accepted: 8-bit modes {sorted(RGB_CONVERTIBLE_MODES)}")
    return img


def check_image_size(width: int, height: int, limits: DataLimits, where: str, member: str) -> None:
    """``image_too_large`` / ``extreme_aspect`` for a width x height over ``limits``."""
    if width * height > limits.max_image_pixels:
        raise SchemaError("image_too_large", where, member,
                          f"{width}x{height} is over max_image_pixels={limits.max_image_pixels}")
    if max(width, height) > limits.max_aspect_ratio * min(width, height):
        raise SchemaError("extreme_aspect", where, member,
                          f"{width}x{height} is over max_aspect_ratio={limits.max_aspect_ratio:g}")


def load_rgb(img: Image.Image, where: str, member: str) -> Image.Image:
    """Decode an ``open_image`` result fully (a truncated file fails here, not in a worker's transform) as RGB."""
    try:
        img.load()
        if "transparency" in img.info:  # palette / grey with a transparent colour: through RGBA, as PIL asks
            img = img.convert("RGBA")
        return img.convert("RGB")
    except Exception as exn:
        raise SchemaError("bad_image", where, member, f"cannot decode image: {exn}") from None


def _decode_image(data: bytes, member: str, where: str, limits: DataLimits = DEFAULT_LIMITS) -> Image.Image:
    ext = member.rsplit(".", 1)[-1]
    return load_rgb(open_image(data, [PIL_FORMATS[ext]], limits, where, member), where, member)


def _decode_array(data: bytes, member: str, where: str) -> np.ndarray:
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exn:
        if "allow_pickle" in str(exn):
            raise SchemaError("pickle_member", where, member, "object-dtype .npy refused (never unpickled)") from None
        raise SchemaError("bad_npy", where, member, str(exn)) from None
    except Exception as exn:
        raise SchemaError("bad_npy", where, member, str(exn)) from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiu":
        raise SchemaError("bad_npy", where, member, f"expected a numeric array, got dtype {getattr(arr, 'dtype', '?')}")
    if not np.isfinite(arr).all():
        raise SchemaError("nonfinite_array", where, member, "array has NaN or inf")
    # checked after the cast to the training dtype: float64 1e300 is finite, float32 inf
    if arr.dtype.kind == "f" and arr.size and float(np.abs(arr).max()) > FLOAT32_MAX:
        raise SchemaError("array_out_of_range", where, member, "values beyond float32 range")
    return arr


# a JSON string literal (escapes included): its brackets are text, not nesting
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_OPENERS, _CLOSERS = np.frombuffer(b"[{", np.uint8), np.frombuffer(b"]}", np.uint8)


def json_depth(data: bytes) -> int:
    """Nesting depth of JSON text, counted without parsing (the parser recurses once per level)."""
    arr = np.frombuffer(_JSON_STRING.sub(b'""', data), np.uint8)
    step = np.isin(arr, _OPENERS).astype(np.int64) - np.isin(arr, _CLOSERS)
    return int(np.cumsum(step).max(initial=0))


def decode_json(data: bytes, where: str, limits: DataLimits = DEFAULT_LIMITS) -> Any:
    """Parse an annotation member within ``limits``: SchemaError ``json_too_large``, ``json_too_deep`` or
    ``bad_json`` (not UTF-8, syntax, numbers Python refuses to parse)."""
    if len(data) > limits.max_json_bytes:
        raise SchemaError("json_too_large", where, "json", f"{len(data)} bytes, over max_json_bytes="
                                                           f"{limits.max_json_bytes}")
    depth = json_depth(data)
    if depth > limits.max_json_depth:
        raise SchemaError("json_too_deep", where, "json", f"nested {depth} deep, over max_json_depth="
                                                          f"{limits.max_json_depth}")
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError:  # not reachable after the depth count; kept so no input can crash the reader
        raise SchemaError("json_too_deep", where, "json", "nesting exhausted the parser") from None
    except (UnicodeDecodeError, ValueError) as exn:  # json.JSONDecodeError is a ValueError
        raise SchemaError("bad_json", where, "json", str(exn)) from None


def _check_arrays(arrays: dict[str, np.ndarray], ann: Annotation, where: str) -> None:
    for pair in (("latent_mean.npy", "latent_std.npy"), ("latent_mean_flip.npy", "latent_std_flip.npy")):
        present = [m in arrays for m in pair]
        if any(present) and not all(present):
            raise SchemaError("incomplete_latents", where, pair[present.index(False)], "mean and std come in pairs")
    latents = [arrays[m] for m in arrays if m.startswith("latent_")]
    if latents and "latent_mean.npy" not in arrays:
        raise SchemaError("incomplete_latents", where, "latent_mean.npy", "flip latents without unflipped ones")
    if latents and (latents[0].ndim != 3 or any(a.shape != latents[0].shape for a in latents)):
        raise SchemaError("bad_latent_shape", where, "latent_*.npy", f"shapes {[a.shape for a in latents]}")
    cap = arrays.get("caption_embeds.npy")
    if cap is not None and (cap.ndim != 2 or cap.shape[0] != CAPTION_EMBED_TOKENS):
        raise SchemaError("bad_embeds_shape", where, "caption_embeds.npy", f"expected [77, D], got {cap.shape}")
    for member in ("phrase_embeds.npy", "entity_embeds.npy"):
        emb = arrays.get(member)
        if emb is not None and (emb.ndim != 2 or emb.shape[0] != len(ann.objects)):
            raise SchemaError("bad_embeds_shape", where, member,
                              f"expected [{len(ann.objects)}, D] (one row per object), got {emb.shape}")


def decode_sample(raw: Mapping[str, Any], url: str = "", limits: DataLimits | None = None) -> DecodedSample:
    """Decode and validate one raw sample (``__key__`` plus member name -> bytes) within ``limits`` (None: the
    defaults). Raises ``SchemaError``."""
    limits = DataLimits.of(limits)
    key = str(raw.get("__key__"))
    where = f"{url}:{key}" if url else key
    for reason, member, message in raw.get("__problems__", ()):  # found while reading the tar
        raise SchemaError(reason, where, member, message)
    if not KEY_RE.match(key):
        raise SchemaError("bad_key", where, "__key__", "keys may not contain dots")
    members = {m: v for m, v in raw.items() if not m.startswith("__")}
    oversized = [m for m, v in members.items() if v is None]
    if oversized:
        raise SchemaError("member_too_large", where, oversized[0], f"larger than {limits.max_member_bytes} bytes")
    total = sum(len(v) for v in members.values())
    if total > limits.max_sample_bytes:
        raise SchemaError("sample_too_large", where, "*", f"{total} bytes, over max_sample_bytes")
    duplicates = raw.get("__duplicates__")
    if duplicates:
        raise SchemaError("duplicate_member", where, duplicates[0], "member appears twice in the shard")
    by_category: dict[str, list[str]] = {}
    for member in members:
        by_category.setdefault(member_category(member, where), []).append(member)

    if ANNOTATION_MEMBER not in members:
        raise SchemaError("missing_json", where, "json", "annotation member missing")
    ann = validate_annotation(decode_json(members[ANNOTATION_MEMBER], where, limits), where)
    check_image_size(ann.width, ann.height, limits, where, "json")

    if CAPTION_MEMBER in members:
        try:
            caption = members[CAPTION_MEMBER].decode("utf-8")
        except UnicodeDecodeError as exn:
            raise SchemaError("bad_caption_encoding", where, "txt", str(exn)) from None
    elif ann.kind == "detection":
        caption = ""
    else:
        raise SchemaError("missing_caption", where, "txt", f"kind {ann.kind} needs a caption")

    arrays = {m: _decode_array(members[m], m, where) for m in by_category.get("array", [])}
    _check_arrays(arrays, ann, where)

    images = by_category.get("image", [])
    if len(images) > 1:
        raise SchemaError("multiple_images", where, ",".join(images), "one image per sample")
    image = None
    if "latent_mean.npy" not in arrays:  # latents stand in for the image; the image is not decoded then
        if not images:
            raise SchemaError("missing_image", where, "jpg|png|webp", "no image and no latents")
        header = open_image(members[images[0]], [PIL_FORMATS[images[0]]], limits, where, images[0])
        if header.size != (ann.width, ann.height):  # from the header, before decoding
            raise SchemaError("image_size_mismatch", where, images[0],
                              f"image is {header.size}, annotation says {(ann.width, ann.height)}")
        image = load_rgb(header, where, images[0])

    entity_images = {m: _decode_image(members[m], m, where, limits) for m in by_category.get("entity_image", [])}
    for i, o in enumerate(ann.objects):
        if o.entity_image is not None and o.entity_image not in entity_images:
            raise SchemaError("missing_entity_image", where, f"objects[{i}].entity_image", o.entity_image)
    return DecodedSample(key=key, url=url, annotation=ann, caption=caption, image=image, arrays=arrays,
                         entity_images=entity_images)
