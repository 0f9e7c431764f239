"""``python -m gligen.data inspect SPEC``: what a shard set holds, read with the safe reader (non-strict).

Counts per kind, per skip reason, the objects-per-image histogram, persons, and which precomputed members exist.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import dataclass, field

from gligen.data.shards import SkipCounter, iter_samples, resolve_shards


@dataclass
class ShardStats:
    samples: int = 0
    kinds: Counter = field(default_factory=Counter)
    objects_per_image: Counter = field(default_factory=Counter)  # number of objects -> images
    images_with_persons: int = 0
    persons: int = 0
    arrays: Counter = field(default_factory=Counter)  # member name -> samples carrying it
    skips: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"samples": self.samples, "kinds": dict(sorted(self.kinds.items())),
                "objects_per_image": {str(k): v for k, v in sorted(self.objects_per_image.items())},
                "images_with_persons": self.images_with_persons, "persons": self.persons,
                "arrays": dict(sorted(self.arrays.items())), "skipped": self.skips}


def collect_stats(spec: str, limit: int | None = None) -> ShardStats:
    stats = ShardStats()
    skips = SkipCounter(strict=False)
    for sample in iter_samples(resolve_shards(spec), skips):
        ann = sample.annotation
        stats.samples += 1
        stats.kinds[ann.kind] += 1
        stats.objects_per_image[len(ann.objects)] += 1
        if ann.persons:
            stats.images_with_persons += 1
            stats.persons += len(ann.persons)
        stats.arrays.update(sample.arrays.keys())
        if limit is not None and stats.samples >= limit:
            break
    stats.skips = skips.summary()
    return stats


def histogram_lines(counts: Counter, width: int = 40) -> list[str]:
    top = max(counts.values(), default=0)
    return [f"  {k:>4} | {'#' * max(1, round(width * v / top)):<{width}} {v}" for k, v in sorted(counts.items())]


def format_stats(spec: str, stats: ShardStats) -> str:
    lines = [f"shards: {spec}", f"samples: {stats.samples}", "kinds:"]
    lines += [f"  {k}: {v}" for k, v in sorted(stats.kinds.items())] or ["  (none)"]
    lines.append(f"skipped: {sum(stats.skips.values())}")
    lines += [f"  {reason}: {n}" for reason, n in stats.skips.items()]
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
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    stats = collect_stats(args.spec, args.limit)
    print(json.dumps(stats.to_json(), indent=1) if args.json else format_stats(args.spec, stats))
    return 0
