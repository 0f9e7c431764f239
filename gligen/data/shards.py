"""Writing and safely reading WebDataset shards of schema-v1 samples.

Safety rule: webdataset's default ``.decode()`` unpickles members with the pyd or pickle extension, i.e. runs code
from the shard. Nothing here uses it. Members are decoded one by one by explicit handlers for the extensions the
schema allows (PIL after a full ``load()``, json, utf-8, ``numpy.load(allow_pickle=False)``); anything else is damage.
"""

from __future__ import annotations

import bz2
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
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from gligen.data.decode import DEFAULT_LIMITS, PIL_FORMATS, DataLimits, SkipCounter, decode_sample
from gligen.data.schema import (
    ANNOTATION_MEMBER,
    SCHEMA_VERSION,
    Annotation,
    DecodedSample,
    SchemaError,
    member_category,
)

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"


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
    path = spec.removesuffix(INDEX_FILE)
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
