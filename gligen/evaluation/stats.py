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

Layouts are not resampled: the set-level metrics (AP over all layouts of a cell) have no per-layout value. With few
training seeds a percentile bootstrap is too narrow (3 seeds: 10 distinct resamples); the summaries say how many
training seeds an interval rests on.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

import numpy as np

CONFIDENCE = 0.95
BOOTSTRAP_SAMPLES = 2000


def nested_values(rows: Iterable[Mapping], metric: str, train_key: str = "train_seed", sample_key: str = "seed"
                  ) -> dict[str, dict[str, float]]:
    """training seed -> sampling seed -> value (rows without a training seed count as training seed "0")."""
    values: dict[str, dict[str, float]] = defaultdict(dict)
    for row in rows:
        if row.get(metric) in (None, ""):
            continue
        values[str(row.get(train_key, 0) or 0)][str(row.get(sample_key, 0))] = float(row[metric])
    return dict(values)


def _bootstrap_means(groups: list[np.ndarray], rng: np.random.Generator, samples: int) -> np.ndarray:
    """`samples` draws of a two-level bootstrap of the mean of group means: pick n groups with replacement, then
    resample each picked group's values with replacement."""
    n = len(groups)
    picks = rng.integers(0, n, size=(samples, n))
    # every group's resampled mean for every (draw, slot) it could fill: [groups, samples, n]
    inner = np.stack([g[rng.integers(0, len(g), size=(samples, n, len(g)))].mean(-1) for g in groups])
    return inner[picks, np.arange(samples)[:, None], np.arange(n)[None, :]].mean(1)


def interval(draws: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    tail = (1 - confidence) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return float(low), float(high)


def summarize_values(nested: Mapping[str, Mapping[str, float]], seed: int = 0, samples: int = BOOTSTRAP_SAMPLES,
                     confidence: float = CONFIDENCE) -> dict[str, float]:
    """mean, std over training seeds, interval (low, high), n_train, n_sample of one arm's nested values."""
    groups = [np.array(list(inner.values()), dtype=float) for inner in nested.values() if inner]
    if not groups:
        raise ValueError("no values to summarize")
    seed_means = np.array([g.mean() for g in groups])
    draws = _bootstrap_means(groups, np.random.default_rng(seed), samples)
    low, high = interval(draws, confidence)
    return {"mean": float(seed_means.mean()), "std_train": float(seed_means.std(ddof=1)) if len(groups) > 1 else 0.0,
            "low": low, "high": high, "n_train": len(groups), "n_sample": int(np.median([len(g) for g in groups]))}


def summarize(rows: Iterable[Mapping], arm: str, metric: str, **kwargs) -> dict[str, dict[str, float]]:
    """Per value of `arm`: `summarize_values` of `metric`."""
    by_arm: dict[str, list[Mapping]] = defaultdict(list)
    for row in rows:
        by_arm[str(row[arm])].append(row)
    nested = {key: nested_values(group, metric) for key, group in by_arm.items()}
    return {key: summarize_values(values, **kwargs) for key, values in nested.items() if values}


def compare(rows: Iterable[Mapping], arm: str, a: str, b: str, metric: str, seed: int = 0,
            samples: int = BOOTSTRAP_SAMPLES, confidence: float = CONFIDENCE, paired: bool | None = None
            ) -> dict[str, float | bool]:
    """b - a for `metric` between two values of `arm`: difference of means, its interval, whether the interval
    excludes 0, and whether it was paired. `paired` None: paired when both arms have the same training and sampling
    seeds; False: unpaired whatever the seeds (arms that are different trained models under the same seed numbers,
    e.g. gamma_init values); True: paired, a ValueError when the seeds differ."""
    rows = list(rows)
    first = nested_values([r for r in rows if str(r[arm]) == str(a)], metric)
    second = nested_values([r for r in rows if str(r[arm]) == str(b)], metric)
    if not first or not second:
        raise ValueError(f"no {metric} rows for {arm} = {a!r} or {b!r}")
    rng = np.random.default_rng(seed)
    same_seeds = first.keys() == second.keys() and all(first[t].keys() == second[t].keys() for t in first)
    if paired and not same_seeds:
        raise ValueError(f"{arm} = {a!r} and {b!r} do not have the same training and sampling seeds: no pairs")
    paired = same_seeds if paired is None else paired
    if paired:
        groups = [np.array([second[t][s] - first[t][s] for s in first[t]]) for t in first]
        draws = _bootstrap_means(groups, rng, samples)
        difference = float(np.mean([g.mean() for g in groups]))
    else:
        ga = [np.array(list(v.values())) for v in first.values()]
        gb = [np.array(list(v.values())) for v in second.values()]
        draws = _bootstrap_means(gb, rng, samples) - _bootstrap_means(ga, rng, samples)
        difference = float(np.mean([g.mean() for g in gb]) - np.mean([g.mean() for g in ga]))
    low, high = interval(draws, confidence)
    return {"difference": difference, "low": low, "high": high, "excludes_zero": bool(low > 0 or high < 0),
            "paired": paired, "n_train": min(len(first), len(second))}


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
