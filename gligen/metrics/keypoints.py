"""Keypoint grounding metrics against a layout's persons: PCK and COCO keypoint AP (OKS), any pose detector.

Persons are [17, 3] rows of normalised x, y and visibility (v > 0: labelled / found), COCO joint order.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy.optimize import linear_sum_assignment

from gligen.constants import COCO_SIGMAS, NUM_KEYPOINTS
from gligen.metrics.resample import APRecords


def keypoint_box(kps: np.ndarray) -> tuple[float, float, float, float]:
    """Normalised xyxy box of the labelled keypoints."""
    xy = kps[kps[:, 2] > 0, :2]
    return float(xy[:, 0].min()), float(xy[:, 1].min()), float(xy[:, 0].max()), float(xy[:, 1].max())


def layout_persons(layout: dict) -> np.ndarray:
    persons = [p["keypoints"] for p in layout.get("persons") or []]
    return np.array(persons, dtype=np.float64).reshape(-1, NUM_KEYPOINTS, 3)


def pck(predicted: list[np.ndarray], layouts: list[dict], threshold: float = 0.1) -> float:
    """Fraction of labelled ground-truth joints within threshold x max(w, h) of their person's keypoint box.

    Persons are matched one-to-one (Hungarian, mean distance over joints found in both); the joints of an
    unmatched ground-truth person, and joints the matched prediction misses, count as wrong.
    """
    correct, total = pck_counts(predicted, layouts, threshold)
    return sum(correct) / sum(total) if sum(total) else 0.0


def pck_counts(predicted: list[np.ndarray], layouts: list[dict], threshold: float = 0.1
               ) -> tuple[list[int], list[int]]:
    """`pck`'s correct and labelled joints per image."""
    correct, total = [], []
    for pred, layout in zip(predicted, layouts):
        gts = layout_persons(layout)
        total.append(sum(int((gt[:, 2] > 0).sum()) for gt in gts))
        correct.append(0)
        if len(gts) == 0 or len(pred) == 0:
            continue
        cost = np.array([[mean_joint_distance(g, p) for p in pred] for g in gts])
        for gi, pi in zip(*linear_sum_assignment(cost)):
            gt, p = gts[gi], pred[pi]
            x0, y0, x1, y1 = keypoint_box(gt)
            scale = max(x1 - x0, y1 - y0)
            both = (gt[:, 2] > 0) & (p[:, 2] > 0)
            dist = np.linalg.norm(gt[:, :2] - p[:, :2], axis=-1)
            correct[-1] += int((both & (dist <= threshold * scale)).sum())
    return correct, total


def mean_joint_distance(gt: np.ndarray, pred: np.ndarray) -> float:
    both = (gt[:, 2] > 0) & (pred[:, 2] > 0)
    return float(np.linalg.norm(gt[both, :2] - pred[both, :2], axis=-1).mean()) if both.any() else 1e3


def keypoint_average_precision(predicted: list[np.ndarray], scores: list[np.ndarray],
                               layouts: list[dict], evaluator=None) -> dict[str, float]:
    """COCO keypoint AP / AP50 / AP75 (OKS thresholds 0.5:0.05:0.95) via pycocotools, pixel coordinates.
    `evaluator`: the inputs' `keypoint_cocoeval`, when the caller has it (None is computed here)."""
    evaluator = evaluator or keypoint_cocoeval(predicted, scores, layouts)
    if evaluator is None:
        return {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and tables
        evaluator.accumulate()
        evaluator.summarize()
    ap, ap50, ap75 = (max(0.0, float(v)) for v in evaluator.stats[:3])
    return {"ap": ap, "ap50": ap50, "ap75": ap75}


def keypoint_ap_records(predicted: list[np.ndarray], scores: list[np.ndarray], layouts: list[dict],
                        evaluator=None) -> APRecords:
    """`keypoint_average_precision`'s OKS matches kept per image (gligen.metrics.resample), for resampling layouts;
    without any ground truth or detection, records whose AP is 0 for every resample (as the metric's).
    `evaluator`: as in `keypoint_average_precision`."""
    evaluator = evaluator or keypoint_cocoeval(predicted, scores, layouts)
    if evaluator is not None:
        return APRecords.from_cocoeval(evaluator)
    gt = [{1: int(sum((p[:, 2] > 0).any() for p in layout_persons(layout)))} for layout in layouts]
    return APRecords([{"det": [], "gt": {c: n for c, n in g.items() if n}} for g in gt], [0.5, 0.75], [0.0, 1.0])


def keypoint_cocoeval(predicted: list[np.ndarray], scores: list[np.ndarray], layouts: list[dict]):
    """A pycocotools COCOeval (iouType keypoints, the project's sigmas) after `evaluate()`; None when there is no
    ground truth or no detection (AP 0)."""
    images, gt_anns, dt_anns = [], [], []
    for image_id, (pred, score, layout) in enumerate(zip(predicted, scores, layouts)):
        w, h = layout["width"], layout["height"]
        images.append({"id": image_id, "width": w, "height": h})
        to_pixels = np.array([w, h, 1.0])
        for gt in layout_persons(layout):
            x0, y0, x1, y1 = keypoint_box(gt)
            box = [x0 * w, y0 * h, (x1 - x0) * w, (y1 - y0) * h]
            gt_anns.append({"id": len(gt_anns) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                            "keypoints": (gt * to_pixels).ravel().tolist(), "num_keypoints": int((gt[:, 2] > 0).sum()),
                            "bbox": box, "area": max(box[2] * box[3], 1.0)})
        for p, s in zip(pred, score):
            dt_anns.append({"image_id": image_id, "category_id": 1, "keypoints": (p * to_pixels).ravel().tolist(),
                            "score": float(s)})
    if not gt_anns or not dt_anns:
        return None
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        gt_coco = COCO()
        gt_coco.dataset = {"images": images, "annotations": gt_anns,
                           "categories": [{"id": 1, "name": "person", "keypoints": [], "skeleton": []}]}
        gt_coco.createIndex()
        evaluator = COCOeval(gt_coco, gt_coco.loadRes(dt_anns), iouType="keypoints")
        evaluator.params.kpt_oks_sigmas = np.array(COCO_SIGMAS)
        evaluator.evaluate()
    return evaluator


def person_box_layout(layout: dict) -> dict:
    """The layout with each person as a "person" object whose box is the box of its labelled keypoints."""
    objects = [{"box": keypoint_box(kps), "category": "person", "phrase": "person"}
               for kps in layout_persons(layout) if (kps[:, 2] > 0).any()]
    return {**layout, "objects": objects}
