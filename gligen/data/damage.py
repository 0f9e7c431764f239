"""A corpus of damaged shard data, one entry per kind of damage, for the fault-injection tests (``pytest -m chaos``)
and for trying the reader by hand (``write_corpus``; then ``python -m gligen.data inspect DIR``).

``SAMPLE_DAMAGE`` maps a kind to the tar members of one damaged sample (built around a valid sample of the given
key) and the outcome the reader must give it; ``SHARD_DAMAGE`` maps a kind to the bytes of a whole damaged shard
file. The outcome is the skip reason a non-strict reader counts (``None``: the sample is valid, e.g. a CMYK JPEG,
which is converted to RGB), plus the valid samples the entry holds and the objects / persons the transform drops.
Nothing here is ever unpickled; the pickle members hold a harmless dict.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import struct
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from gligen.data.examples import annotation, make_sample, png_bytes
from gligen.data.schema import SCHEMA_VERSION
from gligen.data.shards import INDEX_FILE, encode_sample

Members = list[tuple[str, bytes]]


@dataclass(frozen=True)
class Damage:
    reason: str | None  # the counted skip reason; None: valid data that must be read (converted) as such
    build: Callable[..., Members | bytes]  # sample kinds: (key, size) -> members; shard kinds: (size) -> file bytes
    valid: int = 0  # valid samples the entry holds
    dropped: dict = field(default_factory=dict)  # objects / persons the (centre-crop) transform leaves out


# ----------------------------------------------------------------------------------------------- helpers
def _sample(key: str, size: int, **kw) -> dict:
    """A valid encoded sample (member -> bytes) of a size x size image."""
    return encode_sample(make_sample(key, width=size, height=size, seed=len(key), **kw))


def _members(raw: dict, names: dict[str, str] | None = None) -> Members:
    """Tar members of an encoded sample; ``names`` renames some (member -> full tar name)."""
    names = names or {}
    return [(names.get(m, f"{raw['__key__']}.{m}"), v) for m, v in sorted(raw.items()) if m != "__key__"]


def _with(key: str, size: int, **members) -> Members:
    raw = _sample(key, size)
    raw.update(members)
    return _members(raw)


def _with_json(key: str, size: int, ann: dict | list | bytes, **members) -> Members:
    data = ann if isinstance(ann, bytes) else json.dumps(ann, allow_nan=True).encode()
    return _with(key, size, json=data, **members)


def _ann(size: int, **kw) -> dict:
    return annotation(width=size, height=size, **kw)


def _image(mode: str, size: int, fmt: str = "PNG", **save) -> bytes:
    if mode == "I;16":
        img = Image.fromarray(np.arange(size * size, dtype=np.uint16).reshape(size, size) * 1000)
    elif mode == "P":
        img = Image.fromarray(np.arange(size * size, dtype=np.uint8).reshape(size, size) % 4, mode="L").convert("P")
        save.setdefault("transparency", 0)
    else:
        img = Image.new(mode, (size, size), (10, 120, 200, 0) if mode == "CMYK" else 128)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height (CRC fixed, so only the size is a lie)."""
    data = bytearray(png_bytes(1, 1))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def _npy(arr: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def _nested(depth: int) -> bytes:
    head = json.dumps(_ann(8))[:-1].encode()
    return head + b', "extra": ' + b"[" * depth + b"]" * depth + b"}"


def _duplicate_key(key: str, size: int) -> Members:
    first = _members(_sample(key, size))
    return first + _members(_sample(f"{key}-between", size)) + first


def _sized(width: int, height: int, key: str, **ann) -> Members:
    """A sample of a width x height image, not validated (the writer would refuse some of these)."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (40, 90, 160)).save(buf, format="PNG")
    members = {"json": json.dumps(annotation(width=width, height=height, **ann)).encode(), "png": buf.getvalue(),
               "txt": b"a test caption"}
    return [(f"{key}.{m}", v) for m, v in sorted(members.items())]


def _many_objects(key: str, size: int) -> Members:
    boxes = [(0.0, 0.0, 0.5 + 0.01 * i, 0.5) for i in range(35)] + [(0.1, 0.1, 0.12, 0.12)]  # 36th: tiny
    kps = [[0.5, 0.5, 2]] * 17
    return _members(_sample(key, size, boxes=boxes, persons=[kps] * 10))  # 35 + 1 objects, 10 persons


def _outside_crop(key: str, size: int) -> Members:
    # portrait image: the centre crop keeps the middle half of its height
    bottom_kps = [[0.5, 0.95, 2]] * 17
    return _sized(size, 2 * size, key, boxes=[(0.2, 0.3, 0.8, 0.7), (0.2, 0.9, 0.8, 0.99)],
                  persons=[[[0.5, 0.5, 2]] * 17, bottom_kps])


def _latent_sample(key: str, size: int) -> Members:
    return _members(encode_sample(make_sample(key, width=size, height=size, latents=True)))


def _renamed(key: str, size: int, prefix: str) -> Members:
    raw = _sample(key, size)
    return [(prefix + name, data) for name, data in _members(raw)]


SAMPLE_DAMAGE: dict[str, Damage] = {
    # images
    "zero_byte_image": Damage("bad_image", lambda k, s: _with(k, s, png=b"")),
    "truncated_image": Damage("bad_image", lambda k, s: _with(k, s, png=png_bytes(s, s, seed=3)[:60])),
    "garbage_image": Damage("bad_image", lambda k, s: _with(k, s, png=os.urandom(200))),
    "cmyk_image": Damage(None, lambda k, s: [m for m in _with(k, s, jpg=_image("CMYK", s, "JPEG"))
                                            if not m[0].endswith(".png")], valid=1),
    "sixteen_bit_image": Damage("unsupported_image_mode", lambda k, s: _with(k, s, png=_image("I;16", s))),
    "palette_image": Damage(None, lambda k, s: _with(k, s, png=_image("P", s)), valid=1),
    "huge_dimension_image": Damage("image_too_large", lambda k, s: _with(k, s, png=_png_claiming(100_000, 100_000))),
    "extreme_aspect_image": Damage("extreme_aspect", lambda k, s: _sized(1, 100_000, k)),
    # annotation JSON
    "non_utf8_json": Damage("bad_json", lambda k, s: _with_json(k, s, json.dumps(_ann(s)).encode() + b"\xff\xfe")),
    "syntax_error_json": Damage("bad_json", lambda k, s: _with_json(k, s, b'{"schema_version": 1, "kind": ')),
    "list_json": Damage("bad_json", lambda k, s: _with_json(k, s, [_ann(s)])),
    "deeply_nested_json": Damage("json_too_deep", lambda k, s: _with_json(k, s, _nested(100_000))),
    "huge_json": Damage("json_too_large", lambda k, s: _with_json(k, s, _ann(s, source_id="x" * (2**20 + 1)))),
    "huge_int_box": Damage("number_out_of_range", lambda k, s: _with_json(
        k, s, json.dumps(_ann(s)).replace("0.6", "1" * 400).encode())),
    "huge_float_keypoint": Damage("number_out_of_range", lambda k, s: _with_json(
        k, s, _ann(s, persons=[[[1e300, 0.5, 0]] + [[0.5, 0.5, 2]] * 16]))),
    "nan_string_json": Damage("bad_box", lambda k, s: _with_json(k, s, _ann(s, boxes=[("NaN", 0.1, 0.5, 0.5)]))),
    "nan_literal_json": Damage("box_nan", lambda k, s: _with_json(k, s, _ann(s, boxes=[(float("nan"), 0, 1, 1)]))),
    "box_as_strings": Damage("bad_box", lambda k, s: _with_json(k, s, _ann(s, boxes=[("0.1", "0.1", "0.5", "0.5")]))),
    "inverted_box": Damage("box_inverted", lambda k, s: _with_json(k, s, _ann(s, boxes=[(0.6, 0.1, 0.2, 0.5)]))),
    "box_out_of_range": Damage("box_out_of_range",
                               lambda k, s: _with_json(k, s, _ann(s, boxes=[(0.1, 0.1, 1.5, 0.5)]))),
    "wrong_keypoint_count": Damage("bad_keypoint_count", lambda k, s: _with_json(
        k, s, _ann(s, persons=[[[0.5, 0.5, 2]] * 16]))),
    # arrays and members
    "object_dtype_npy": Damage("pickle_member", lambda k, s: _with(
        k, s, **{"caption_embeds.npy": _npy(np.array([{"a": 1}] * 77, dtype=object), allow_pickle=True)})),
    "wrong_shape_npy": Damage("bad_embeds_shape", lambda k, s: _with(
        k, s, **{"caption_embeds.npy": _npy(np.zeros((76, 4), np.float32))})),
    "float64_overflow_npy": Damage("array_out_of_range", lambda k, s: _with(
        k, s, **{"caption_embeds.npy": _npy(np.full((77, 4), 1e300))})),
    "pickle_member": Damage("pickle_member", lambda k, s: _with(k, s, pyd=pickle.dumps({"harmless": 1}))),
    "unknown_member": Damage("unknown_member", lambda k, s: _with(k, s, cls=b"3")),
    "path_traversal_member": Damage("unsafe_name", lambda k, s: _renamed(k, s, "../")),
    "absolute_member": Damage("unsafe_name", lambda k, s: _renamed(k, s, "/tmp/")),
    "duplicate_key": Damage("duplicate_key", _duplicate_key, valid=2),
    # batch-level: valid alone, but not stackable with the rest of a pixel-image corpus
    "latents_in_pixel_source": Damage("image_form_mismatch", _latent_sample),
    # valid samples whose transform leaves objects and persons out: counted drops, not skips
    "over_cap_objects": Damage(None, _many_objects, valid=1,
                               dropped={"object_over_cap": 5, "object_below_min_area": 1, "person_over_cap": 2}),
    "outside_crop": Damage(None, _outside_crop, valid=1,
                           dropped={"object_outside_crop": 1, "person_outside_crop": 1}),
}


def _tar(samples: list[Members], end: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for members in samples:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _truncated(size: int) -> bytes:
    data = _tar([_members(_sample(f"trunc{i}", size)) for i in range(3)])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        last = tar.getmembers()[-1]  # third sample's last member: cut inside its data
    return data[:last.offset_data + last.size // 2]


def _gzip_bomb(size: int) -> bytes:
    info = tarfile.TarInfo("bomb.txt")
    info.size = 40 * 2**20
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write(info.tobuf(format=tarfile.GNU_FORMAT))
        zeros = bytes(2**20)
        for _ in range(40):
            gz.write(zeros)
        gz.write(bytes(1024))
    return buf.getvalue()


SHARD_DAMAGE: dict[str, Damage] = {
    "truncated_tar": Damage("truncated_tar", _truncated, valid=2),  # the sample being read is dropped
    "empty_tar": Damage("empty_shard", lambda s: _tar([])),
    "zero_byte_tar": Damage("empty_shard", lambda s: b""),
    "garbage_tar": Damage("bad_tar", lambda s: bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8))),
    "gzip_bomb": Damage("compression_bomb", _gzip_bomb),
}

DAMAGE: dict[str, Damage] = {**SAMPLE_DAMAGE, **SHARD_DAMAGE}


# ------------------------------------------------------------------------------------------------ the corpus
@dataclass
class Corpus:
    root: str
    sample_shard: str  # good samples around every sample-level damage kind
    shard_files: dict[str, str]  # shard kind -> its file
    valid: int  # valid samples in the whole corpus
    valid_in_sample_shard: int

    def expected(self, shards: bool = True) -> Counter:
        """Skip reasons and their counts for one reading of the sample shard (plus the shard kinds)."""
        kinds = [k for k in SAMPLE_DAMAGE] + (list(SHARD_DAMAGE) if shards else [])
        return Counter(DAMAGE[k].reason for k in kinds if DAMAGE[k].reason is not None)

    @staticmethod
    def expected_drops() -> Counter:
        out: Counter = Counter()
        for damage in DAMAGE.values():
            out.update(damage.dropped)
        return out


def kind_key(kind: str) -> str:
    return "bad-" + kind.replace("_", "-")


def write_kind(path: str, kind: str, size: int = 8, lead: int = 0, tail: int = 0) -> str:
    """One shard file holding ``kind`` (sample kinds: between ``lead`` and ``tail`` valid samples)."""
    damage = DAMAGE[kind]
    if kind in SHARD_DAMAGE:
        data = damage.build(size)
    else:
        good = [_members(_sample(f"good{i:03d}", size)) for i in range(lead + tail)]
        data = _tar(good[:lead] + [damage.build(kind_key(kind), size)] + good[lead:])
    with open(path, "wb") as f:
        f.write(data)
    return path


def write_corpus(root: str, size: int = 8, lead: int = 4, tail: int = 4) -> Corpus:
    """``root``/samples.tar: ``lead`` valid samples, every sample-level kind in order, ``tail`` valid samples (so
    one reading ends on a valid sample), and one file per shard-level kind; ``index.json`` lists them all."""
    os.makedirs(root, exist_ok=True)
    good = [_members(_sample(f"good{i:03d}", size)) for i in range(lead + tail)]
    damaged = [damage.build(kind_key(kind), size) for kind, damage in SAMPLE_DAMAGE.items()]
    sample_shard = os.path.join(root, "samples.tar")
    with open(sample_shard, "wb") as f:
        f.write(_tar(good[:lead] + damaged + good[lead:]))
    shard_files = {}
    for kind, damage in SHARD_DAMAGE.items():
        name = f"{kind}.tar.gz" if kind == "gzip_bomb" else f"{kind}.tar"
        shard_files[kind] = os.path.join(root, name)
        with open(shard_files[kind], "wb") as f:
            f.write(damage.build(size))
    names = ["samples.tar"] + [os.path.basename(p) for p in shard_files.values()]
    with open(os.path.join(root, INDEX_FILE), "w") as f:
        json.dump({"schema_version": SCHEMA_VERSION, "shards": [{"name": n} for n in names]}, f)
    in_sample_shard = lead + tail + sum(d.valid for d in SAMPLE_DAMAGE.values())
    return Corpus(root, sample_shard, shard_files, in_sample_shard + sum(d.valid for d in SHARD_DAMAGE.values()),
                  in_sample_shard)
