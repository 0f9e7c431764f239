"""Writing and safely reading WebDataset shards of schema-v1 samples.

Safety rule: webdataset's default ``.decode()`` unpickles members with the pyd or pickle extension, i.e. runs
code from the shard. Nothing here uses it. Members are decoded one by one by explicit handlers for the extensions the schema
allows (PIL after a full ``load()``, json, utf-8, ``numpy.load(allow_pickle=False)``); anything else is damage.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import io
import json
import logging
import lzma
import os
import re
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import webdataset as wds
from PIL import Image
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from gligen.data.schema import (
    ANNOTATION_MEMBER,
    CAPTION_MEMBER,
    FLOAT32_MAX,
    KEY_RE,
    SCHEMA_VERSION,
    Annotation,
    DecodedSample,
    SchemaError,
    member_category,
    validate_annotation,
)

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
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
    def of(cls, limits: "DataLimits | Mapping[str, Any] | None") -> "DataLimits":
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


# --------------------------------------------------------------------------------------------------- reading
class _EndCheckingTarInfo(tarfile.TarInfo):
    """Remembers whether header reading stopped at a zero block. tarfile treats a file that ends at (or inside)
    a header as a normal end of archive, so without this a tar cut at a member boundary reads as complete."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.clean_end = True
            raise


class CompressionBomb(OSError):
    """A compressed shard inflates beyond ``DataLimits.max_compression_ratio``."""


class _RawStream:
    """The shard's bytes as read (counted, for the compression ratio), with the first few peeked for the magic."""

    def __init__(self, f):
        self.f, self.count, self.head = f, 0, b""

    def peek(self, n: int) -> bytes:
        self.head = self.f.read(n)
        self.count += len(self.head)
        return self.head

    def read(self, n: int = -1) -> bytes:
        head, self.head = (self.head, b"") if n is None or n < 0 or n >= len(self.head) else \
            (self.head[:n], self.head[n:])
        rest = n - len(head) if n is not None and n >= 0 else -1
        data = self.f.read(rest) if rest != 0 else b""
        self.count += len(data)
        return head + data


class _InflateGuard:
    """Reads a decompressing stream and stops it once it inflates more than the limits allow."""

    def __init__(self, inner, raw: _RawStream, limits: DataLimits):
        self.inner, self.raw, self.limits, self.out = inner, raw, limits, 0

    def read(self, n: int = -1) -> bytes:
        data = self.inner.read(n)
        self.out += len(data)
        if self.out > self.limits.compression_check_bytes and \
                self.out > self.limits.max_compression_ratio * max(1, self.raw.count):
            raise CompressionBomb(f"{self.raw.count} compressed bytes inflated to over {self.out} "
                                  f"(max_compression_ratio={self.limits.max_compression_ratio:g})")
        return data


_COMPRESSED = ((b"\x1f\x8b", gzip.GzipFile), (b"BZh", bz2.BZ2File), (b"\xfd7zXZ\x00", lzma.LZMAFile))


def _tar_members(stream, limits: DataLimits = DEFAULT_LIMITS) -> Iterator[tuple[str, bytes | None, str | None]]:
    """(name, bytes, problem) of the members of a tar stream (plain, or gzip / bzip2 / xz compressed: inflation
    is guarded by ``limits``). ``problem`` names why a member is not read: ``member_too_large`` (bytes None),
    ``special_member`` (a link, device or fifo). Directories are passed over. Raises tarfile.ReadError on
    truncation, ``CompressionBomb``."""
    raw = _RawStream(stream)
    magic = raw.peek(6)
    for prefix, opener in _COMPRESSED:
        if magic.startswith(prefix):
            stream = _InflateGuard(opener(fileobj=raw, mode="rb"), raw, limits)
            break
    else:
        stream = raw
    tar = tarfile.open(fileobj=stream, mode="r|", tarinfo=_EndCheckingTarInfo)
    tar.clean_end = getattr(tar, "clean_end", False)  # already True when the archive has no member at all
    for info in tar:
        if info.isreg() and info.size > limits.max_member_bytes:
            yield info.name, None, "member_too_large"  # left unread; decode_sample reports it
        elif info.isreg():
            yield info.name, tar.extractfile(info).read(), None  # raises ReadError when data runs out
        elif not info.isdir():
            yield info.name, b"", "special_member"
        tar.members = []  # streaming: do not accumulate every header
    if not tar.clean_end:
        raise tarfile.ReadError("no end-of-archive block: the tar is truncated")


def unsafe_name(name: str) -> bool:
    """Whether a member name could point outside a folder it were extracted into (absolute, '..', drive)."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or ".." in parts or bool(re.match(r"^[A-Za-z]:", name)) or "\0" in name


def _group_members(members: Iterable[tuple[str, bytes | None, str | None]], url: str,
                   limits: DataLimits = DEFAULT_LIMITS) -> Iterator[dict]:
    """Group consecutive tar members by key (webdataset naming: key = name up to the first dot of the basename).
    Unlike webdataset's grouper, a duplicate member marks the sample as damaged instead of aborting the shard;
    so do an unsafe name, a special member and a sample over ``max_sample_bytes`` (whose bytes are let go)."""
    current: dict | None = None
    size = 0
    for name, data, problem in members:
        key, member = base_plus_ext(name)
        if key is None:  # a name without an extension cannot belong to a sample: an unknown member
            key, member = name, ""
        if current is None or key != current["__key__"]:
            if current is not None:
                yield current
            current, size = {"__key__": key, "__url__": url}, 0
        member = member.lower()
        if unsafe_name(name):
            current.setdefault("__problems__", []).append(("unsafe_name", name, "absolute or '..' member name"))
        if problem == "special_member":
            current.setdefault("__problems__", []).append((problem, name, "a link, device or fifo: not sample data"))
            continue
        size += len(data or b"")
        if size > limits.max_sample_bytes:
            current.setdefault("__problems__", []).append(
                ("sample_too_large", name, f"members over max_sample_bytes={limits.max_sample_bytes}"))
            for m in [m for m in current if not m.startswith("__")]:
                current[m] = b""  # let the bytes go: the sample is skipped
            data = b""
        if member in current:
            current.setdefault("__duplicates__", []).append(member)
        else:
            current[member] = data
    if current is not None:
        yield current


def _shard_failure(exn: BaseException, samples_read: int) -> str:
    """The skip reason of a shard that failed to read."""
    message = str(exn)
    if isinstance(exn, CompressionBomb):
        return "compression_bomb"
    if samples_read == 0 and message == "empty file":
        return "empty_shard"
    if isinstance(exn, (zlib.error, lzma.LZMAError, gzip.BadGzipFile)) or \
            (isinstance(exn, tarfile.ReadError) and ("bad checksum" in message or "invalid header" in message)):
        return "bad_tar"
    return "truncated_tar"


def iter_raw_samples(url: str, skips: SkipCounter, limits: DataLimits | None = None) -> Iterator[dict]:
    """Raw samples of one shard. A truncated or unreadable tar is counted once and the shard abandoned; the
    sample being read when the data ran out is dropped with it (it may be incomplete). A sample key seen before
    in the same shard is counted (``duplicate_key``) and not yielded again; a shard without samples is counted
    as ``empty_shard``."""
    limits = DataLimits.of(limits)
    try:
        stream = gopen(url, "rb")
    except OSError as exn:
        skips.record("unreadable_shard", url, None, str(exn))
        return
    last_key, seen = None, set()
    try:
        # the grouper yields a sample only once the next key (or the clean end) shows it complete
        for raw in _group_members(_tar_members(stream, limits), url, limits):
            last_key = raw["__key__"]
            if last_key in seen:
                skips.record("duplicate_key", url, last_key, "key seen before in this shard; read once")
                continue
            seen.add(last_key)
            yield raw
        if not seen:
            skips.record("empty_shard", url, None, "no samples")
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as exn:
        skips.record(_shard_failure(exn, len(seen)), url, last_key, f"{type(exn).__name__}: {exn}")
    finally:
        stream.close()


def decode_or_skip(raw: Mapping[str, Any], skips: SkipCounter, limits: DataLimits | None = None
                   ) -> DecodedSample | None:
    """``decode_sample``, with a damaged sample counted in ``skips`` (None returned) or raised in strict mode."""
    url = raw.get("__url__", "")
    try:
        sample = decode_sample(raw, url, limits)
    except SchemaError as exn:
        skips.record(exn.reason, url, raw.get("__key__"), str(exn))
        return None
    skips.accepted += 1
    return sample


def iter_samples(urls: Iterable[str], skips: SkipCounter, limits: DataLimits | None = None
                 ) -> Iterator[DecodedSample]:
    """Decoded, validated samples of the given shards; damaged ones are counted in ``skips`` (or raise)."""
    for url in urls:
        for raw in iter_raw_samples(url, skips, limits):
            sample = decode_or_skip(raw, skips, limits)
            if sample is not None:
                yield sample


def _index_shards(path: str) -> list[str]:
    """Shard paths listed in ``path``/index.json; every name must stay inside ``path`` (ValueError otherwise)."""
    index_path = os.path.join(path, INDEX_FILE)
    with open(index_path) as f:
        index = json.load(f)
    if not isinstance(index, dict) or index.get("schema_version") != SCHEMA_VERSION:
        version = index.get("schema_version") if isinstance(index, dict) else None
        raise ValueError(f"{path}: index.json has schema_version {version!r}, this code reads {SCHEMA_VERSION}")
    shards = index.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) and isinstance(s.get("name"), str) for s in shards):
        raise ValueError(f"{index_path}: 'shards' must be a list of {{'name': str, ...}}")
    root = os.path.realpath(path)
    urls = []
    for shard in shards:
        name = shard["name"]
        full = os.path.realpath(os.path.join(root, name))
        if not name or unsafe_name(name) or os.path.commonpath([root, full]) != root:
            raise ValueError(f"{index_path}: shard name {name!r} leaves the folder {path}")
        urls.append(os.path.join(path, name))
    return urls


def resolve_shards(spec: str) -> list[str]:
    """Shard urls of a spec: a directory (or its index.json) written by ``write_shards``, or a webdataset
    pattern such as ``data/shard-{000000..000009}.tar`` (brace expansion); ``::`` joins several specs."""
    if "::" in spec:
        return [url for part in spec.split("::") for url in resolve_shards(part)]
    path = spec[:-len(INDEX_FILE)] if spec.endswith(INDEX_FILE) else spec
    if os.path.isdir(path):
        return _index_shards(path)
    urls = expand_urls(spec)
    if not urls:
        raise ValueError(f"no shards match {spec!r}")
    remote = "://" in spec or spec.startswith("pipe:")
    if urls == [spec] and not remote and not os.path.exists(spec):
        # a plain local path that is not there: say so now, not as unreadable shards inside a loader worker
        raise FileNotFoundError(f"{spec}: no shard directory or tar file there (was it written? the toy world's "
                                "train shards: python -m gligen.toy build)")
    return urls


# --------------------------------------------------------------------------------------------------- writing
def _encode_member(member: str, value: Any, where: str) -> bytes:
    category = member_category(member, where)
    if category in ("image", "entity_image"):
        if isinstance(value, Image.Image):
            buf = io.BytesIO()
            value.save(buf, format=PIL_FORMATS[member.rsplit(".", 1)[-1]])
            return buf.getvalue()
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
    elif category == "caption":
        if isinstance(value, str):
            return value.encode("utf-8")
    elif category == "annotation":
        if isinstance(value, Annotation):
            value = value.to_json()
        if isinstance(value, dict):
            return json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
    elif category == "array":
        buf = io.BytesIO()
        np.save(buf, np.asarray(value), allow_pickle=False)
        return buf.getvalue()
    raise TypeError(f"{where}: {member}: cannot encode a {type(value).__name__} as a {category} member")


def encode_sample(sample: Mapping[str, Any]) -> dict[str, Any]:
    """Encode one sample dict to member bytes, then decode it back: the writer validates with exactly the code
    the reader runs, so a shard that was written is a shard that reads. Raises SchemaError / TypeError."""
    key = sample.get("__key__")
    if not isinstance(key, str):
        raise SchemaError("bad_key", str(key), "__key__", "expected a string key")
    encoded: dict[str, Any] = {"__key__": key}
    for member, value in sample.items():
        if not member.startswith("__"):
            encoded[member] = _encode_member(member, value, key)
    decode_sample(encoded)
    return encoded


def write_shards(samples: Iterable[Mapping[str, Any]], out_dir: str, prefix: str = "shard",
                 max_samples: int = 1000, max_bytes: int | None = None, progress: bool = True) -> dict:
    """Write samples to ``{out_dir}/{prefix}-{i:06d}.tar`` (``max_samples`` per shard, the last one shorter;
    ``max_bytes`` optionally caps a shard's member payload, tar headers not counted; the shard that crosses it is closed
    after that sample) plus ``index.json``. Returns the index."""
    from tqdm import tqdm

    os.makedirs(out_dir, exist_ok=True)
    pattern = os.path.join(out_dir, f"{prefix.replace('%', '%%')}-%06d.tar")
    counts: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    keys: set[str] = set()
    # mtime fixed: the same samples give byte-identical shards; encoder=False: members are bytes already
    with wds.ShardWriter(pattern, maxcount=max_samples, maxsize=max_bytes or float("inf"), verbose=0,
                         mtime=0, encoder=False) as writer:
        for sample in tqdm(samples, desc=f"writing {prefix}", disable=not progress):
            encoded = encode_sample(sample)
            if encoded["__key__"] in keys:
                raise ValueError(f"duplicate sample key {encoded['__key__']!r}")
            keys.add(encoded["__key__"])
            writer.write(encoded)
            counts[os.path.basename(writer.fname)] += 1
            kinds[json.loads(encoded[ANNOTATION_MEMBER])["kind"]] += 1
        last = writer.fname
    if not counts:  # ShardWriter opens its first shard eagerly; no samples means no shard
        os.remove(last)
    index = {
        "schema_version": SCHEMA_VERSION,
        "shards": [{"name": name, "samples": n, "bytes": os.path.getsize(os.path.join(out_dir, name))}
                   for name, n in sorted(counts.items())],
        "kinds": dict(sorted(kinds.items())),
        "total": sum(counts.values()),
    }
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=1)
    return index
