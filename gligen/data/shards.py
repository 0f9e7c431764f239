"""Writing and safely reading WebDataset shards of schema-v1 samples.

Safety rule: webdataset's default ``.decode()`` unpickles members with the pyd or pickle extension, i.e. runs
code from the shard. Nothing here uses it. Members are decoded one by one by explicit handlers for the extensions the schema
allows (PIL after a full ``load()``, json, utf-8, ``numpy.load(allow_pickle=False)``); anything else is damage.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections import Counter
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


# ----------------------------------------------------------------------------------------------- skip accounting
class DamagedSampleError(RuntimeError):
    """Raised in strict mode instead of skipping; names the shard and the sample key."""

    def __init__(self, reason: str, url: str, key: str | None, message: str):
        self.reason, self.url, self.key = reason, url, key
        super().__init__(f"damaged sample ({reason}) in shard {url}, key {key}: {message}")


class SkipCounter:
    """Per-reason counts of skipped samples. Logs the first skip of each reason (with shard url and key)."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.counts: Counter[str] = Counter()
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

    def summary(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


# -------------------------------------------------------------------------------------------------- decoding
def _decode_image(data: bytes, member: str, where: str) -> Image.Image:
    ext = member.rsplit(".", 1)[-1]
    try:
        img = Image.open(io.BytesIO(data), formats=[PIL_FORMATS[ext]])
        img.load()  # decode fully now: a truncated file must fail here, not later inside a worker's transform
        return img.convert("RGB")
    except Exception as exn:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise SchemaError("bad_image", where, member, f"cannot decode image: {exn}") from None


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
    return arr


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


def decode_sample(raw: Mapping[str, Any], url: str = "") -> DecodedSample:
    """Decode and validate one raw sample (``__key__`` plus member name -> bytes). Raises ``SchemaError``."""
    key = str(raw.get("__key__"))
    where = f"{url}:{key}" if url else key
    if not KEY_RE.match(key):
        raise SchemaError("bad_key", where, "__key__", "keys may not contain dots")
    members = {m: v for m, v in raw.items() if not m.startswith("__")}
    oversized = [m for m, v in members.items() if v is None]
    if oversized:
        raise SchemaError("member_too_large", where, oversized[0], f"larger than {MAX_MEMBER_BYTES} bytes")
    duplicates = raw.get("__duplicates__")
    if duplicates:
        raise SchemaError("duplicate_member", where, duplicates[0], "member appears twice in the shard")
    by_category: dict[str, list[str]] = {}
    for member in members:
        by_category.setdefault(member_category(member, where), []).append(member)

    if ANNOTATION_MEMBER not in members:
        raise SchemaError("missing_json", where, "json", "annotation member missing")
    try:
        obj = json.loads(members[ANNOTATION_MEMBER].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exn:  # json.JSONDecodeError is a ValueError
        raise SchemaError("bad_json", where, "json", str(exn)) from None
    ann = validate_annotation(obj, where)

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
        image = _decode_image(members[images[0]], images[0], where)
        if image.size != (ann.width, ann.height):
            raise SchemaError("image_size_mismatch", where, images[0],
                              f"image is {image.size}, annotation says {(ann.width, ann.height)}")

    entity_images = {m: _decode_image(members[m], m, where) for m in by_category.get("entity_image", [])}
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


def _tar_members(stream) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files of a tar stream; raises tarfile.ReadError on truncation."""
    tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndCheckingTarInfo)
    tar.clean_end = False
    for info in tar:
        if info.isreg() and info.size > MAX_MEMBER_BYTES:
            yield info.name, None  # left unread; decode_sample reports it
        elif info.isreg():
            yield info.name, tar.extractfile(info).read()  # raises ReadError when data runs out
        tar.members = []  # streaming: do not accumulate every header
    if not tar.clean_end:
        raise tarfile.ReadError("no end-of-archive block: the tar is truncated")


def _group_members(members: Iterable[tuple[str, bytes]], url: str) -> Iterator[dict]:
    """Group consecutive tar members by key (webdataset naming: key = name up to the first dot of the basename).
    Unlike webdataset's grouper, a duplicate member marks the sample as damaged instead of aborting the shard."""
    current: dict | None = None
    for name, data in members:
        key, member = base_plus_ext(name)
        if key is None:  # a name without an extension cannot belong to a sample: an unknown member
            key, member = name, ""
        if current is None or key != current["__key__"]:
            if current is not None:
                yield current
            current = {"__key__": key, "__url__": url}
        member = member.lower()
        if member in current:
            current.setdefault("__duplicates__", []).append(member)
        else:
            current[member] = data
    if current is not None:
        yield current


def iter_raw_samples(url: str, skips: SkipCounter) -> Iterator[dict]:
    """Raw samples of one shard. A truncated or unreadable tar is counted once and the shard abandoned; the
    sample being read when the data ran out is dropped with it (it may be incomplete)."""
    try:
        stream = gopen(url, "rb")
    except OSError as exn:
        skips.record("unreadable_shard", url, None, str(exn))
        return
    last_key = None
    try:
        # the grouper yields a sample only once the next key (or the clean end) shows it complete
        for raw in _group_members(_tar_members(stream), url):
            last_key = raw["__key__"]
            yield raw
    except (tarfile.TarError, EOFError, OSError) as exn:
        skips.record("truncated_tar", url, last_key, f"{type(exn).__name__}: {exn}")
    finally:
        stream.close()


def decode_or_skip(raw: Mapping[str, Any], skips: SkipCounter) -> DecodedSample | None:
    """``decode_sample``, with a damaged sample counted in ``skips`` (None returned) or raised in strict mode."""
    url = raw.get("__url__", "")
    try:
        sample = decode_sample(raw, url)
    except SchemaError as exn:
        skips.record(exn.reason, url, raw.get("__key__"), str(exn))
        return None
    skips.accepted += 1
    return sample


def iter_samples(urls: Iterable[str], skips: SkipCounter) -> Iterator[DecodedSample]:
    """Decoded, validated samples of the given shards; damaged ones are counted in ``skips`` (or raise)."""
    for url in urls:
        for raw in iter_raw_samples(url, skips):
            sample = decode_or_skip(raw, skips)
            if sample is not None:
                yield sample


def resolve_shards(spec: str) -> list[str]:
    """Shard urls of a spec: a directory (or its index.json) written by ``write_shards``, or a webdataset
    pattern such as ``data/shard-{000000..000009}.tar`` (brace expansion); ``::`` joins several specs."""
    if "::" in spec:
        return [url for part in spec.split("::") for url in resolve_shards(part)]
    path = spec[:-len(INDEX_FILE)] if spec.endswith(INDEX_FILE) else spec
    if os.path.isdir(path):
        with open(os.path.join(path, INDEX_FILE)) as f:
            index = json.load(f)
        if index.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"{path}: index.json has schema_version {index.get('schema_version')!r}, "
                             f"this code reads {SCHEMA_VERSION}")
        return [os.path.join(path, s["name"]) for s in index["shards"]]
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
