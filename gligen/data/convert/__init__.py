"""Converters from public annotation formats to schema-v1 shards, and their shared plumbing.

Every converter yields sample dicts (``write_shards`` input). Problems in the input never abort a run: a sample that
cannot be built is skipped and an object that cannot be kept is dropped, each counted under a reason with the first
few occurrences named (file and key / row) in a ``ConvertReport``, which is printed and saved as
``convert_report.json`` next to ``index.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from gligen.data.decode import PIL_FORMATS, DataLimits, load_rgb, open_image
from gligen.data.schema import SchemaError
from gligen.data.shards import encode_sample, write_shards

REPORT_FILE = "convert_report.json"
MAX_EXAMPLES = 5  # named occurrences kept per reason; the rest are only counted
_EXT_OF_FORMAT = {fmt: ext for ext, fmt in PIL_FORMATS.items()}
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")


class ConvertError(ValueError):
    """A sample (or object) of the input cannot be converted. ``reason`` is the report tag."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


class ConvertReport:
    """Counts of written samples, skipped samples and dropped objects, by reason, with named examples."""

    def __init__(self, source: str = ""):
        self.source = source
        self.written = 0
        self.skipped: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.notes: Counter[str] = Counter()  # kept, but altered (e.g. clipped)
        self.examples: dict[str, list[str]] = {}

    def _note(self, counter: Counter, reason: str, where: str, message: str) -> None:
        counter[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(f"{where}: {message}")

    def skip_sample(self, reason: str, where: str, message: str) -> None:
        self._note(self.skipped, reason, where, message)

    def drop_object(self, reason: str, where: str, message: str) -> None:
        self._note(self.dropped, reason, where, message)

    def note(self, reason: str, where: str, message: str) -> None:
        self._note(self.notes, reason, where, message)

    def to_json(self) -> dict:
        return {"source": self.source, "written": self.written, "skipped_samples": dict(sorted(self.skipped.items())),
                "dropped_objects": dict(sorted(self.dropped.items())), "notes": dict(sorted(self.notes.items())),
                "examples": self.examples}

    def format(self) -> str:
        head = (f"{self.source}: wrote {self.written} samples, skipped {sum(self.skipped.values())}, "
                f"dropped {sum(self.dropped.values())} objects")
        lines = [head]
        for title, counter in (("skipped samples", self.skipped), ("dropped objects", self.dropped),
                               ("notes", self.notes)):
            for reason, n in sorted(counter.items()):
                lines.append(f"  {title}: {reason}: {n}")
                lines.extend(f"    e.g. {e}" for e in self.examples.get(reason, []))
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- geometry
def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def normalise_xywh(bbox: Any, width: int, height: int) -> tuple[float, float, float, float]:
    """COCO ``[x, y, w, h]`` in pixels -> xyxy normalised to the image, clipped to [0, 1].

    Raises ConvertError ``bad_bbox`` (not 4 finite numbers, negative size), ``zero_area_box`` or
    ``box_outside_image`` (nothing left after clipping)."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_is_number(c) for c in bbox):
        raise ConvertError("bad_bbox", f"expected [x, y, w, h] numbers, got {bbox!r}")
    x, y, w, h = (float(c) for c in bbox)
    if w < 0 or h < 0:
        raise ConvertError("bad_bbox", f"negative width or height in {bbox!r}")
    if w == 0 or h == 0:
        raise ConvertError("zero_area_box", f"zero-area box {bbox!r}")
    box = (x / width, y / height, (x + w) / width, (y + h) / height)
    # annotation tools round: boxes poking a fraction of a pixel outside the image are clipped, not dropped
    x0, y0, x1, y1 = (min(max(c, 0.0), 1.0) for c in box)
    if x1 <= x0 or y1 <= y0:
        raise ConvertError("box_outside_image", f"box {bbox!r} lies outside the {width}x{height} image")
    return (x0, y0, x1, y1)


def phrase_from_spans(caption: str, spans: Any) -> str:
    """The caption substrings named by ``tokens_positive`` character spans ``[[start, end], ...]``, joined with a
    space. Raises ConvertError ``bad_tokens_positive``."""
    if not isinstance(spans, (list, tuple)) or not spans:
        raise ConvertError("bad_tokens_positive", f"expected a non-empty list of [start, end], got {spans!r}")
    parts = []
    for span in spans:
        ok = (isinstance(span, (list, tuple)) and len(span) == 2 and all(isinstance(c, int) for c in span)
              and 0 <= span[0] < span[1] <= len(caption))
        if not ok:
            raise ConvertError("bad_tokens_positive", f"span {span!r} does not index the caption "
                                                      f"({len(caption)} characters)")
        parts.append(caption[span[0]:span[1]])
    phrase = " ".join(p.strip() for p in parts)
    if not phrase.strip():
        raise ConvertError("bad_tokens_positive", f"spans {spans!r} select only whitespace")
    return phrase


# --------------------------------------------------------------------------------------------------- images
def image_member(data: bytes, limits: DataLimits | None = None) -> tuple[str, bytes, tuple[int, int]]:
    """Check encoded image bytes decode fully, exactly as the shard reader will; return (member name, bytes,
    (width, height)). The bytes are stored as they are (no re-encoding loss).

    Only JPEG, PNG and WebP are opened: PIL would otherwise try every plugin it has (EPS runs Ghostscript where
    installed). Raises ConvertError ``bad_image`` (includes any other format), ``image_too_large``,
    ``extreme_aspect`` or ``unsupported_image_mode`` (``gligen.data.decode.DataLimits``)."""
    try:
        img = open_image(data, PIL_FORMATS.values(), DataLimits.of(limits), "", "image")
        load_rgb(img, "", "image")  # a truncated file fails here, at conversion, not in a training worker
    except SchemaError as exn:
        raise ConvertError(exn.reason, str(exn).split(": ", 2)[-1]) from None
    return _EXT_OF_FORMAT[img.format], data, img.size


def read_image_file(path: str, width: int | None = None, height: int | None = None) -> tuple[str, bytes]:
    """Image file -> (member name, bytes); checks the size the annotation declares. Raises ConvertError
    ``missing_image``, ``bad_image`` or ``image_size_mismatch``."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exn:
        raise ConvertError("missing_image", f"cannot read {path}: {exn.strerror or exn}") from None
    ext, data, size = image_member(data)
    if width is not None and size != (width, height):
        raise ConvertError("image_size_mismatch", f"{path} is {size[0]}x{size[1]}, annotation says {width}x{height}")
    return ext, data


# ---------------------------------------------------------------------------------------------------- misc
def sample_key(*parts: Any) -> str:
    """A shard-safe sample key (no dots, no path separators) from source identifiers."""
    return "-".join(_UNSAFE_KEY_CHARS.sub("_", str(p)) for p in parts)


def choose_caption(captions: Sequence[str], image_id: Any, seed: int = 0) -> str:
    """One caption per image, fixed by (seed, image id): reruns and shard orders agree, images vary in which of
    their captions they get (always taking the first would bias toward one annotator)."""
    return captions[zlib.crc32(f"{seed}:{image_id}".encode()) % len(captions)]


def load_json_file(path: str) -> Any:
    """The whole JSON input; an unreadable annotation file is fatal (ValueError naming it), not a skip."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exn:
        raise ValueError(f"cannot read annotation file {path}: {exn}") from None


def validated(samples: Iterable[Mapping[str, Any]], report: ConvertReport) -> Iterator[Mapping[str, Any]]:
    """Drop samples the schema rejects (checked with the writer's own encoder), so one bad sample cannot abort
    ``write_shards``; duplicate keys are skipped too."""
    seen: set[str] = set()
    for sample in samples:
        key = sample["__key__"]
        if key in seen:
            report.skip_sample("duplicate_key", key, "a sample with this key was already written")
            continue
        try:
            encode_sample(sample)
        except SchemaError as exn:
            report.skip_sample(f"schema_{exn.reason}", key, str(exn))
            continue
        seen.add(key)
        report.written += 1
        yield sample


def write_converted(samples: Iterable[Mapping[str, Any]], report: ConvertReport, out_dir: str,
                    prefix: str = "shard", max_samples: int = 1000, max_bytes: int | None = None,
                    progress: bool = True) -> dict:
    """``write_shards`` over the valid samples, then ``convert_report.json``; returns the shard index."""
    index = write_shards(validated(samples, report), out_dir, prefix=prefix, max_samples=max_samples,
                         max_bytes=max_bytes, progress=progress)
    with open(os.path.join(out_dir, REPORT_FILE), "w") as f:
        json.dump(report.to_json(), f, indent=1)
    return index


# ----------------------------------------------------------------------------------------------------- CLI
def parse_size(text: str) -> int:
    """'5000', '64M', '1.5G' -> bytes (powers of 1024)."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMG]?)i?B?\s*", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(float(match.group(1)) * units[match.group(2)])


def add_output_arguments(parser: argparse.ArgumentParser, default_prefix: str) -> None:
    parser.add_argument("--out", required=True, help="output directory (shards + index.json + convert_report.json)")
    parser.add_argument("--prefix", default=default_prefix, help="shard file name prefix")
    parser.add_argument("--max-samples", type=int, default=1000, help="samples per shard")
    parser.add_argument("--max-bytes", type=parse_size, default=None, help="cap on a shard's payload, e.g. 1G")
    parser.add_argument("--limit", type=int, default=None, help="convert only the first N input images / rows")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def output_kwargs(args: argparse.Namespace) -> dict:
    return {"out_dir": args.out, "prefix": args.prefix, "max_samples": args.max_samples,
            "max_bytes": args.max_bytes, "progress": not args.no_progress}


def finish(report: ConvertReport, index: dict) -> int:
    """Print the report (stderr) and the index total (stdout); exit status 0 even with skips: they are data."""
    print(report.format(), file=sys.stderr)
    print(json.dumps({"total": index["total"], "kinds": index["kinds"], "shards": len(index["shards"])}))
    return 0
