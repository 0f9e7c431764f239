"""Statistics every experiment reports: means over training seeds, their spread, and 95% intervals.

Rows are results of one (arm, training seed, sampling seed): an arm is a tau, a modality, a gamma init, ... Training
seeds are the unit of replication (each is a separately trained model); sampling seeds nest inside them. So:

- `summarize`: per arm, the mean over training seeds of each seed's mean over sampling seeds, the std over training
  seeds (0 with one training seed: then only sampling noise is known), and a percentile interval from a two-level
  bootstrap (training seeds with replacement, then sampling seeds with replacement inside each).
- `compare`: arm b minus arm a, with its bootstrap interval and whether it excludes 0. Paired when both arms share
  their training seeds (tau values of one model: the difference is taken per training and sampling seed before
  resampling), unpaired otherwise (different models per arm: each arm is resampled on its own). `paired=False`
  forces unpaired for arms that are different models under the same seed numbers (gamma_init arms of a grid).

Layouts are the third level where the rows carry layout records (`layout_records`: gligen.metrics.resample, written
by sweeps since the records existed): every bootstrap draw also draws the layouts with replacement, the same
multiset for every row, arm and seed of the draw (the layouts are shared by all of them, so paired differences stay
paired over layouts too), and each row's metric is recomputed on that multiset (AP from its per-image COCO
matches). Rows without records (FID / KID, which have no per-layout form here, and rows written before the records)
keep their one value in every draw. With few training seeds a percentile bootstrap is too narrow (3 seeds: 10
distinct resamples); the summaries say how many training seeds an interval rests on and whether layouts were
resampled.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from functools import lru_cache

import numpy as np

from gligen.metrics.resample import ROW_KEY as RECORDS

CONFIDENCE = 0.95
BOOTSTRAP_SAMPLES = 2000


def _records(row: Mapping, metric: str):
    """The row's layout records of `metric` (None where the row has none for it)."""
    records = row.get(RECORDS)
    return records if hasattr(records, "metrics") and metric in records.metrics else None


def nested_values(rows: Iterable[Mapping], metric: str, train_key: str = "train_seed", sample_key: str = "seed"
                  ) -> dict[str, dict[str, float]]:
    """training seed -> sampling seed -> value (rows without a training seed count as training seed "0")."""
    return {t: {s: value for s, (value, _) in inner.items()}
            for t, inner in _nested(rows, metric, train_key, sample_key).items()}


def _nested(rows: Iterable[Mapping], metric: str, train_key: str = "train_seed", sample_key: str = "seed"
            ) -> dict[str, dict[str, tuple[float, object]]]:
    """training seed -> sampling seed -> (value, layout records or None)."""
    values: dict[str, dict[str, tuple[float, object]]] = defaultdict(dict)
    for row in rows:
        if row.get(metric) in (None, ""):
            continue
        values[str(row.get(train_key, 0) or 0)][str(row.get(sample_key, 0))] = (float(row[metric]),
                                                                                _records(row, metric))
    return dict(values)


@lru_cache(maxsize=8)
def layout_weights(n_layouts: int, samples: int, seed: int) -> np.ndarray:
    """[samples, n_layouts] multiplicities of the layouts in each bootstrap draw (a multinomial resample), the same
    for every row of one bootstrap (its own generator: the seed and sampling-seed draws are unchanged by it)."""
    rng = np.random.default_rng([seed, n_layouts, 0x1A70])
    weights = rng.multinomial(n_layouts, np.full(n_layouts, 1 / n_layouts), size=samples).astype(np.float64)
    weights.flags.writeable = False
    return weights


def _draws(cell: tuple[float, object], metric: str, samples: int, seed: int) -> np.ndarray:
    """One row's metric per bootstrap draw: [samples] on resampled layouts where it has records, else [1]."""
    value, records = cell
    if records is None:
        return np.array([value])
    n = records.n_images
    return records.values(metric, layout_weights(n, samples, seed), cache_key=(n, samples, seed))


def _groups(nested: Mapping[str, Mapping[str, tuple[float, object]]], metric: str, samples: int, seed: int
            ) -> list[np.ndarray]:
    """Per training seed: [sampling seeds, draws] values (draws 1 where nothing resamples layouts)."""
    return [_stack([_draws(cell, metric, samples, seed) for cell in inner.values()]) for inner in nested.values()]


def _stack(values: list[np.ndarray]) -> np.ndarray:
    """One group: each value's [draws] (or [1]: the same in every draw) as rows of one [values, draws] array."""
    width = max(len(v) for v in values)
    return np.stack([np.broadcast_to(v, (width,)) for v in values])


def _bootstrap_means(groups: list[np.ndarray], rng: np.random.Generator, samples: int) -> np.ndarray:
    """`samples` draws of a two-level bootstrap of the mean of group means: pick n groups with replacement, then
    resample each picked group's values with replacement. A group is [values] or [values, samples] (each value's
    own number in every draw: the metric on that draw's resampled layouts)."""
    n = len(groups)
    picks = rng.integers(0, n, size=(samples, n))
    draw = np.arange(samples)
    inner = []  # every group's resampled mean for every (draw, slot) it could fill: [groups, samples, n]
    for g in groups:
        index = rng.integers(0, len(g), size=(samples, n, len(g)))
        per_draw = g.ndim == 2 and g.shape[1] > 1
        values = g[index, draw[:, None, None]] if per_draw else g.reshape(len(g), -1)[index, 0]
        inner.append(values.mean(-1))
    return np.stack(inner)[picks, draw[:, None], np.arange(n)[None, :]].mean(1)


def resampled_metrics(rows: Iterable[Mapping], metrics: list[str]) -> tuple[list[str], int]:
    """The metrics whose every row has layout records (their intervals resample layouts), and the layout count."""
    rows = list(rows)
    found = [m for m in metrics if all(_records(r, m) is not None for r in rows if r.get(m) not in (None, ""))
             and any(_records(r, m) is not None for r in rows)]
    sizes = {r[RECORDS].n_images for r in rows if found and _records(r, found[0]) is not None}
    return found, max(sizes, default=0)


def interval(draws: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    tail = (1 - confidence) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return float(low), float(high)


def summarize_values(nested: Mapping[str, Mapping[str, float]], seed: int = 0, samples: int = BOOTSTRAP_SAMPLES,
                     confidence: float = CONFIDENCE, metric: str | None = None) -> dict[str, float]:
    """mean, std over training seeds, interval (low, high), n_train, n_sample, layouts_resampled of one arm's nested
    values: floats, or (value, layout records) pairs of `metric` (`_nested`)."""
    nested = {t: {s: v if isinstance(v, tuple) else (float(v), None) for s, v in inner.items()}
              for t, inner in nested.items() if inner}
    if not nested:
        raise ValueError("no values to summarize")
    seed_means = np.array(_seed_means(nested))
    groups = _groups(nested, metric, samples, seed)
    draws = _bootstrap_means(groups, np.random.default_rng(seed), samples)
    low, high = interval(draws, confidence)
    return {"mean": float(seed_means.mean()), "std_train": float(seed_means.std(ddof=1)) if len(nested) > 1 else 0.0,
            "low": low, "high": high, "n_train": len(nested),
            "n_sample": int(np.median([len(inner) for inner in nested.values()])),
            "layouts_resampled": _resampled(nested)}


def _seed_means(nested: Mapping[str, Mapping[str, tuple[float, object]]]) -> list[float]:
    """Per training seed: the mean of its values over sampling seeds."""
    return [float(np.mean([v for v, _ in inner.values()])) for inner in nested.values()]


def _resampled(*nested: Mapping[str, Mapping[str, tuple[float, object]]]) -> bool:
    """True when every value has layout records (its interval resamples layouts)."""
    return all(records is not None for n in nested for inner in n.values() for _, records in inner.values())


def summarize(rows: Iterable[Mapping], arm: str, metric: str, **kwargs) -> dict[str, dict[str, float]]:
    """Per value of `arm`: `summarize_values` of `metric`."""
    by_arm: dict[str, list[Mapping]] = defaultdict(list)
    for row in rows:
        by_arm[str(row[arm])].append(row)
    nested = {key: _nested(group, metric) for key, group in by_arm.items()}
    return {key: summarize_values(values, metric=metric, **kwargs) for key, values in nested.items() if values}


def compare(rows: Iterable[Mapping], arm: str, a: str, b: str, metric: str, seed: int = 0,
            samples: int = BOOTSTRAP_SAMPLES, confidence: float = CONFIDENCE, paired: bool | None = None
            ) -> dict[str, float | bool]:
    """b - a for `metric` between two values of `arm`: difference of means, its interval, whether the interval
    excludes 0, and whether it was paired. `paired` None: paired when both arms have the same training and sampling
    seeds; False: unpaired whatever the seeds (arms that are different trained models under the same seed numbers,
    e.g. gamma_init values); True: paired, a ValueError when the seeds differ. Layouts, where the rows have records,
    are resampled with the same multiset in both arms."""
    rows = list(rows)
    first = _nested([r for r in rows if str(r[arm]) == str(a)], metric)
    second = _nested([r for r in rows if str(r[arm]) == str(b)], metric)
    if not first or not second:
        raise ValueError(f"no {metric} rows for {arm} = {a!r} or {b!r}")
    rng = np.random.default_rng(seed)
    same_seeds = first.keys() == second.keys() and all(first[t].keys() == second[t].keys() for t in first)
    if paired and not same_seeds:
        raise ValueError(f"{arm} = {a!r} and {b!r} do not have the same training and sampling seeds: no pairs")
    paired = same_seeds if paired is None else paired
    if paired:  # per training and sampling seed: b - a (in every draw, on the same resampled layouts)
        groups = [_stack([_draws(second[t][s], metric, samples, seed) - _draws(first[t][s], metric, samples, seed)
                          for s in first[t]]) for t in first]
        draws = _bootstrap_means(groups, rng, samples)
        difference = float(np.mean([np.mean([second[t][s][0] - first[t][s][0] for s in first[t]]) for t in first]))
    else:
        ga, gb = _groups(first, metric, samples, seed), _groups(second, metric, samples, seed)
        draws = _bootstrap_means(gb, rng, samples) - _bootstrap_means(ga, rng, samples)
        difference = float(np.mean(_seed_means(second)) - np.mean(_seed_means(first)))
    low, high = interval(draws, confidence)
    return {"difference": difference, "low": low, "high": high, "excludes_zero": bool(low > 0 or high < 0),
            "paired": paired, "n_train": min(len(first), len(second)),
            "layouts_resampled": _resampled(first, second)}


def comparisons(rows: list[Mapping], arm: str, baseline: str, metrics: list[str], paired: bool | None = None
                ) -> dict[str, dict[str, dict]]:
    """metric -> other arm value -> `compare(rows, arm, baseline, other, metric, paired=paired)` (arms without the
    metric left out)."""
    out: dict[str, dict[str, dict]] = {}
    for metric in metrics:
        measured = {str(r[arm]) for r in rows if r.get(metric) not in (None, "")}
        others = sorted(measured - {str(baseline)}, key=arm_order) if str(baseline) in measured else []
        out[metric] = {other: compare(rows, arm, baseline, other, metric, paired=paired) for other in others}
    return out


def indistinct_metrics(found: Mapping[str, Mapping[str, Mapping]]) -> list[str]:
    """The metrics of `comparisons` that no arm moves away from the baseline beyond its interval (every difference's
    interval holds 0): at a floor, a ceiling, or inside their noise for this run, so not a headline."""
    return [metric for metric, by_arm in found.items()
            if by_arm and not any(c["excludes_zero"] for c in by_arm.values())]


def interval_table(rows: list[Mapping], arm: str, metrics: list[str], digits: int = 3) -> str:
    """Markdown: per arm value, each metric as `mean ± std_train [low, high]` (n training seeds)."""
    stats = {m: summarize(rows, arm, m) for m in metrics}
    keys = sorted({k for s in stats.values() for k in s}, key=arm_order)
    lines = [f"| {arm} | training seeds | " + " | ".join(metrics) + " |", "|" + "---|" * (len(metrics) + 2)]
    for key in keys:
        n = max(stats[m][key]["n_train"] for m in metrics if key in stats[m])
        cells = [(f"{s['mean']:.{digits}f} ± {s['std_train']:.{digits}f} [{s['low']:.{digits}f}, "
                  f"{s['high']:.{digits}f}]") if (s := stats[m].get(key)) else "" for m in metrics]
        lines.append(f"| {key} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_table(found: Mapping[str, Mapping[str, Mapping]], arm: str, baseline: str, digits: int = 3) -> str:
    """Markdown of `comparisons`: every other arm value minus `baseline`, per metric `difference [low, high]` (* =
    excludes 0)."""
    metrics = list(found)
    others = sorted({other for by_arm in found.values() for other in by_arm}, key=arm_order)
    lines = [f"| {arm} - {baseline} | " + " | ".join(metrics) + " |", "|" + "---|" * (len(metrics) + 1)]
    for other in others:
        cells = []
        for metric in metrics:
            c = found[metric].get(other)
            mark = " *" if c and c["excludes_zero"] else ""
            cells.append(f"{c['difference']:+.{digits}f} [{c['low']:+.{digits}f}, {c['high']:+.{digits}f}]{mark}"
                         if c else "")
        lines.append(f"| {other} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def arm_order(key: str):
    """Sort key of arm values: numbers by value, then names."""
    try:
        return (0, float(key), "")
    except ValueError:
        return (1, 0.0, key)
