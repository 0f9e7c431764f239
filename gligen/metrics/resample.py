"""Per-layout records of set-level metrics, so that a bootstrap can resample the layouts.

A sweep cell's AP is a property of the whole set of its images: it has no per-layout value to resample. COCO's
protocol, though, matches detections to ground truth image by image (pycocotools' `evaluateImg`) and only pools
the matches afterwards (`accumulate`). So the matches are kept per image (`APRecords.from_cocoeval`), and the AP of
any multiset of the images (a bootstrap resample counts image i w_i times) is `accumulate` with weights: each
image's detections count w_i times in the cumulative true / false positives and its ground truth w_i times in the
recall's denominator. With every weight 1 this is the AP the sweep reports (`RowRecords.mismatches` checks it when
the records are made). pycocotools has no weighted accumulate, hence this one (vectorised over draws: a replicated
image's copies are adjacent in the score order, and the interpolated precision over such a block equals its value
at the block's end, so weights give the AP of the replicated set, exactly but for the order of equal scores).

Means over objects or joints (mIoU, PCK) keep per-image sums and counts (`MeanRecords`).

A sweep row's records (`RowRecords`: metric -> record and key) are written next to its rows as JSON
(`layout_records.json`, never pickled), keyed by a hash of their content that the row's `layout_records` column
names; `gligen.evaluation.stats` reads them to resample layouts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence

import numpy as np

ROW_KEY = "layout_records"  # the result row column holding a row's RowRecords (in a CSV: their content id)
EPS = np.spacing(1)  # pycocotools' guard in precision = tp / (tp + fp + eps)


def _bits(flags: np.ndarray) -> list[int]:
    """[T, D] booleans -> one int per detection, bit t set where flags[t] (JSON-sized)."""
    return (flags.astype(np.int64) << np.arange(flags.shape[0])[:, None]).sum(0).tolist() if flags.size else []


def _unbits(masks: Sequence[int], thresholds: int) -> np.ndarray:
    return (np.asarray(masks, dtype=np.int64)[None, :] >> np.arange(thresholds)[:, None]) & 1 == 1


class APRecords:
    """One image set's COCO matches, per image: detections (category, score, true / false positive at each IoU
    threshold; neither = ignored) and non-ignored ground-truth counts per category. `values(weights)`: AP / AP50 /
    AP75 of the weighted image set, one per row of weights."""

    kind = "ap"

    def __init__(self, images: list[dict], iou_thresholds: Sequence[float], rec_thresholds: Sequence[float]):
        # images[i] = {"det": [[category, score, tp bits, fp bits], ...] (pycocotools' order), "gt": {category: n}}
        self.images = images
        self.iou_thresholds = [float(t) for t in iou_thresholds]
        self.rec_thresholds = np.asarray(rec_thresholds, dtype=np.float64)
        self._pooled = None

    @property
    def n_images(self) -> int:
        return len(self.images)

    @classmethod
    def from_cocoeval(cls, evaluator) -> APRecords:
        """The per-image matches of a pycocotools COCOeval after `evaluate()`, at its last maxDets and the "all" area
        range (what AP / AP50 / AP75 use)."""
        params = evaluator.params
        image_ids = list(params.imgIds)
        categories = [int(c) for c in params.catIds] if params.useCats else [-1]
        n_areas, n_images = len(params.areaRng), len(image_ids)
        max_det = params.maxDets[-1]
        images = [{"det": [], "gt": {}} for _ in image_ids]
        for k, category in enumerate(categories):
            for i in range(n_images):
                e = evaluator.evalImgs[k * n_areas * n_images + i]  # area range 0: "all"
                if e is None:
                    continue
                matched, ignored = np.asarray(e["dtMatches"])[:, :max_det] > 0, np.asarray(e["dtIgnore"])[:, :max_det]
                tp, fp = _bits(matched & ~ignored), _bits(~matched & ~ignored)
                images[i]["det"] += [[category, float(s), t, f] for s, t, f in zip(e["dtScores"][:max_det], tp, fp)]
                n_gt = int((np.asarray(e["gtIgnore"]) == 0).sum())
                if n_gt:
                    images[i]["gt"][category] = n_gt
        return cls(images, params.iouThrs, params.recThrs)

    def _pool(self):
        """Per category, pycocotools' pooled order (images in order, each image's detections in its order, then a
        stable sort by score): image index, tp and fp [T, D]; and the ground-truth count per image."""
        if self._pooled is None:
            n_t = len(self.iou_thresholds)
            categories = sorted({d[0] for im in self.images for d in im["det"]} |
                                {int(c) for im in self.images for c in im["gt"]})
            pooled = {}
            for category in categories:
                rows = [(i, d[1], d[2], d[3]) for i, im in enumerate(self.images) for d in im["det"]
                        if d[0] == category]
                gt = np.array([float(im["gt"].get(category, 0)) for im in self.images])
                if rows:
                    image, score, tp, fp = (np.array(col) for col in zip(*rows))
                    order = np.argsort(-score, kind="mergesort")
                    pooled[category] = (image[order].astype(int), _unbits(tp[order], n_t), _unbits(fp[order], n_t), gt)
                else:
                    pooled[category] = (np.zeros(0, int), np.zeros((n_t, 0), bool), np.zeros((n_t, 0), bool), gt)
            self._pooled = pooled
        return self._pooled

    def _threshold_index(self, threshold: float) -> int:
        return int(np.argmin(np.abs(np.array(self.iou_thresholds) - threshold)))

    def values(self, weights: np.ndarray, keys: tuple[str, ...] = ("ap", "ap50", "ap75")) -> dict[str, np.ndarray]:
        """weights [B, n_images] (image multiplicities) -> the asked of {"ap", "ap50", "ap75"}: [B] each (only the
        IoU thresholds they need are computed: AP50 alone is a tenth of the work of AP)."""
        weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
        named = {"ap50": self._threshold_index(0.5), "ap75": self._threshold_index(0.75)}
        used = list(range(len(self.iou_thresholds))) if "ap" in keys else sorted({named[k] for k in keys})
        n_r = len(self.rec_thresholds)
        per_category = []
        for image, tp, fp, gt in self._pool().values():
            n_gt = weights @ gt  # [B]
            q = np.zeros((len(weights), len(used)))
            if len(image):
                w = weights[:, image][:, None, :]  # [B, 1, D]
                tps, fps = np.cumsum(w * tp[used], -1), np.cumsum(w * fp[used], -1)  # [B, T, D]
                with np.errstate(divide="ignore", invalid="ignore"):
                    recall = np.where(n_gt[:, None, None] > 0, tps / n_gt[:, None, None], 0.0)
                precision = tps / (tps + fps + EPS)
                envelope = np.flip(np.maximum.accumulate(np.flip(precision, -1), -1), -1)
                # recall thresholds r whose first point with recall >= r is point i: (recall[i-1], recall[i]]
                reached = np.searchsorted(self.rec_thresholds, recall, side="right")
                newly = np.diff(reached, axis=-1, prepend=0)
                q = (envelope * newly).sum(-1) / n_r
            per_category.append(np.where(n_gt[:, None] > 0, q, np.nan))  # no ground truth: not averaged (COCO's -1)
        if not per_category:
            return {key: np.zeros(len(weights)) for key in keys}
        stacked = np.stack(per_category)  # [K, B, T]
        counted = (~np.isnan(stacked)).sum(0)  # categories with ground truth, per draw and threshold
        by_threshold = np.nansum(stacked, 0) / np.maximum(counted, 1)  # [B, T]; no ground truth at all: 0
        out = {key: by_threshold[:, used.index(named[key])] for key in keys if key != "ap"}
        if "ap" in keys:
            out["ap"] = by_threshold.mean(-1)
        return out

    def to_json(self) -> dict:
        return {"kind": self.kind, "iou_thresholds": self.iou_thresholds,
                "rec_thresholds": self.rec_thresholds.tolist(),
                "images": [{"det": im["det"], "gt": [[int(c), n] for c, n in im["gt"].items()]} for im in self.images]}

    @classmethod
    def from_json(cls, data: Mapping) -> APRecords:
        images = [{"det": [list(d) for d in im["det"]], "gt": {int(c): int(n) for c, n in im["gt"]}}
                  for im in data["images"]]
        return cls(images, data["iou_thresholds"], data["rec_thresholds"])


class MeanRecords:
    """A mean over objects or joints, kept as per-image sums and counts: `values(weights)` = the weighted ratio."""

    kind = "mean"

    def __init__(self, sums: Sequence[float], counts: Sequence[float]):
        self.sums, self.counts = np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.float64)

    @property
    def n_images(self) -> int:
        return len(self.sums)

    def values(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
        total = weights @ self.counts
        with np.errstate(divide="ignore", invalid="ignore"):
            return {"mean": np.where(total > 0, (weights @ self.sums) / total, 0.0)}

    def to_json(self) -> dict:
        return {"kind": self.kind, "sums": self.sums.tolist(), "counts": self.counts.tolist()}

    @classmethod
    def from_json(cls, data: Mapping) -> MeanRecords:
        return cls(data["sums"], data["counts"])


RECORD_KINDS = {cls.kind: cls for cls in (APRecords, MeanRecords)}
# records read from files, by content: the same records in two result folders (a claims or modality table and its
# cells) are resampled once per process (`RowRecords.values`); bounded, cleared when full
_SHARED_VALUES: dict = {}
_SHARED_LIMIT = 4096


class RowRecords:
    """A sweep row's layout records: metric name -> (record, key of the record's `values`)."""

    def __init__(self):
        self.families: dict[str, APRecords | MeanRecords] = {}
        self.metrics: dict[str, tuple[str, str]] = {}
        self._cache: dict = {}
        self._shared_id: str | None = None  # content id of records read from a file (`from_json(shared=True)`)

    def add(self, family: str, record: APRecords | MeanRecords, metrics: Mapping[str, str]) -> None:
        """`metrics`: the row's metric name -> the record's value key, e.g. {"coarse_ap50": "ap50"}."""
        self.families[family] = record
        self.metrics.update({name: (family, key) for name, key in metrics.items()})

    def alias(self, name: str, metric: str) -> None:
        """`name` resamples as `metric` does (a column that repeats a metric under another name)."""
        if metric in self.metrics:
            self.metrics[name] = self.metrics[metric]

    def drop(self, metric: str) -> None:
        self.metrics.pop(metric, None)
        used = {family for family, _ in self.metrics.values()}
        self.families = {k: v for k, v in self.families.items() if k in used}

    @property
    def n_images(self) -> int:
        sizes = {record.n_images for record in self.families.values()}
        if len(sizes) > 1:
            raise ValueError(f"layout records of different image counts in one row: {sorted(sizes)}")
        return sizes.pop() if sizes else 0

    def values(self, metric: str, weights: np.ndarray, cache_key=None) -> np.ndarray:
        """The metric on each row of `weights` ([B, n_images]); `cache_key` names the weights to reuse a result."""
        family, key = self.metrics[metric]
        cache, slot = self._cache, (family, key, cache_key)
        if self._shared_id is not None:
            cache, slot = _SHARED_VALUES, (self._shared_id, *slot)
        if cache_key is not None and slot in cache:
            return cache[slot]
        record = self.families[family]
        found = (record.values(weights, (key,)) if isinstance(record, APRecords) else record.values(weights))[key]
        if cache_key is not None:
            if cache is _SHARED_VALUES and len(cache) >= _SHARED_LIMIT:
                cache.clear()
            found.flags.writeable = False  # handed to every later caller: nobody may change it in place
            cache[slot] = found
        return found

    def mismatches(self, row: Mapping, tolerance: float = 1e-6) -> list[str]:
        """The metrics whose value on the full layout set (every weight 1) is not the row's (records that would
        resample another metric than the one reported). The tolerance allows torchmetrics' float32 AP."""
        ones = np.ones((1, self.n_images))
        return [m for m in self.metrics
                if row.get(m) in (None, "") or abs(float(self.values(m, ones)[0]) - float(row[m])) > tolerance]

    def to_json(self) -> dict:
        return {"metrics": {m: list(v) for m, v in self.metrics.items()},
                "families": {name: record.to_json() for name, record in self.families.items()}}

    @classmethod
    def from_json(cls, data: Mapping, shared: bool = False) -> RowRecords:
        """`shared`: resampled values are shared with every other shared record of the same content (its id
        computed here from `data`, not trusted from a file's key)."""
        records = cls()
        records.families = {name: RECORD_KINDS[f["kind"]].from_json(f) for name, f in data["families"].items()}
        records.metrics = {m: (family, key) for m, (family, key) in data["metrics"].items()}
        if shared:
            records._shared_id = records.content_id()
        return records

    def content_id(self) -> str:
        """A hash of the records' JSON: the id a row's `layout_records` column names."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]
