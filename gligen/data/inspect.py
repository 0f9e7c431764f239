"""``python -m gligen.data inspect SPEC``: what a shard set holds, read with the safe reader (non-strict).

Counts per kind, per skip reason, the objects-per-image histogram, persons, and which precomputed members exist.
Every sample goes through what training does to it (decoding within the limits, the deterministic transform, the
batch shape check), so the skip and drop reasons are the ones training would count.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass, field

from gligen.data.collate import BatchShapes, example_signature
from gligen.data.decode import DataLimits, SkipCounter
from gligen.data.shards import iter_samples, resolve_shards
from gligen.data.transforms import TransformConfig, transform_or_skip

SETTLE_SAMPLES = 64  # the batch shapes are the majority over this many first samples (like a first batch)


@dataclass
class ShardStats:
    samples: int = 0
    kinds: Counter = field(default_factory=Counter)
    objects_per_image: Counter = field(default_factory=Counter)  # number of objects -> images
    images_with_persons: int = 0
    persons: int = 0
    arrays: Counter = field(default_factory=Counter)  # member name -> samples carrying it
    skips: dict = field(default_factory=dict)
    dropped: dict = field(default_factory=dict)  # objects / persons left out of kept samples, by reason

    def to_json(self) -> dict:
        return {"samples": self.samples, "kinds": dict(sorted(self.kinds.items())),
                "objects_per_image": {str(k): v for k, v in sorted(self.objects_per_image.items())},
                "images_with_persons": self.images_with_persons, "persons": self.persons,
                "arrays": dict(sorted(self.arrays.items())), "skipped": self.skips, "dropped": self.dropped}


def collect_stats(spec: str, limit: int | None = None, resolution: int = 512,
                  limits: DataLimits | dict | None = None) -> ShardStats:
    """Read ``spec`` as training would (validation geometry at ``resolution``) and count."""
    stats = ShardStats()
    skips = SkipCounter(strict=False)
    cfg = TransformConfig(resolution, random_flip=False)
    shapes = BatchShapes()
    pending: list = []  # (sample, signature) until the batch shapes are settled

    def count(sample, signature) -> None:
        problem = shapes.mismatch(signature)
        if problem is not None:
            skips.record(problem[0], sample.url, sample.key, problem[1])
            return
        ann = sample.annotation
        stats.samples += 1
        stats.kinds[ann.kind] += 1
        stats.objects_per_image[len(ann.objects)] += 1
        if ann.persons:
            stats.images_with_persons += 1
            stats.persons += len(ann.persons)
        stats.arrays.update(sample.arrays.keys())

    for sample in iter_samples(resolve_shards(spec), skips, DataLimits.of(limits)):
        example = transform_or_skip(sample, cfg, None, skips)
        if example is None:
            continue
        pending.append((sample, example_signature(example)))
        if len(pending) >= SETTLE_SAMPLES:
            shapes.settle([signature for _, signature in pending])  # fixes only entries not seen before
            for item in pending:
                count(*item)
            pending = []
        if limit is not None and stats.samples + len(pending) >= limit:
            break
    shapes.settle([signature for _, signature in pending])
    for item in pending:
        count(*item)
    stats.skips, stats.dropped = skips.summary(), dict(sorted(skips.dropped.items()))
    return stats


def histogram_lines(counts: Counter, width: int = 40) -> list[str]:
    top = max(counts.values(), default=0)
    return [f"  {k:>4} | {'#' * max(1, round(width * v / top)):<{width}} {v}" for k, v in sorted(counts.items())]


def format_stats(spec: str, stats: ShardStats) -> str:
    lines = [f"shards: {spec}", f"samples: {stats.samples}", "kinds:"]
    lines += [f"  {k}: {v}" for k, v in sorted(stats.kinds.items())] or ["  (none)"]
    lines.append(f"skipped: {sum(stats.skips.values())}")
    lines += [f"  {reason}: {n}" for reason, n in stats.skips.items()]
    lines.append(f"dropped objects / persons (of kept samples): {sum(stats.dropped.values())}")
    lines += [f"  {reason}: {n}" for reason, n in stats.dropped.items()]
    lines.append("objects per image:")
    lines += histogram_lines(stats.objects_per_image) or ["  (none)"]
    lines.append(f"persons: {stats.persons} in {stats.images_with_persons} images")
    if stats.arrays:
        lines.append("precomputed members:")
        lines += [f"  {m}: {n}" for m, n in sorted(stats.arrays.items())]
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("inspect", help="counts, skip reasons and object histogram of a shard set")
    parser.add_argument("spec", help="shard directory, index.json, or pattern ('::' joins several)")
    parser.add_argument("--limit", type=int, default=None, help="stop after N valid samples")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--resolution", type=int, default=512, help="transform resolution (as training's)")
    parser.add_argument("--limits", type=json.loads, default=None,
                        help='reader limits as JSON, e.g. \'{"max_image_pixels": 100000000}\' (docs/data.md)')
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    """Exit status 0 whatever the samples hold (damage is data: counted); 2 when the spec itself is unusable."""
    try:
        stats = collect_stats(args.spec, args.limit, args.resolution, args.limits)
    except (OSError, ValueError) as exn:  # no such directory, an index.json that is invalid or leaves its folder
        print(f"inspect: {args.spec}: {exn}", file=sys.stderr)
        return 2
    print(json.dumps(stats.to_json(), indent=1) if args.json else format_stats(args.spec, stats))
    return 0
