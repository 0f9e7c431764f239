"""Exact rule-based read-back of toy-world images, and the grounding metrics built on it.

Objects: every pixel is assigned to its nearest palette colour (black background included) if it lies within
`COLOUR_DISTANCE`; per colour, each 8-connected component above a minimum size is one detection. The box is the
component's tight box (never min/max over all matching pixels: stray noise pixels of a generated image would
inflate it), the shape is the best-matching template (``world.match_shape``), and the score is
purity x shape match x size factor, so that clean, well-formed, object-sized blobs rank first for AP.

Keypoints: every pixel goes to its nearest colour among black, limb grey and the 17 joint colours; persons are the
8-connected components of the (slightly dilated, so broken limbs still join) non-black mask; inside each person,
each joint is the centroid of the largest component of that joint's colour (within `COLOUR_DISTANCE`).
Limitation: figures that touch in a generated image are read as one person and only one of them gets joints (the
world keeps figures apart, so real toy images never do this); a joint not found has v = 0.

Images are uint8 [H, W, 3] RGB arrays (PIL images are accepted and converted).

Metrics (all plain floats):
- evaluate_boxes: AP, AP50, AP75 (torchmetrics MeanAveragePrecision, pixel xyxy boxes, label = category index)
  against the input layout; mIoU (mean over layout objects of the best IoU of a same-category detection, 0 if
  none); count accuracy (images with exactly as many detections as layout objects); caption accuracy (images
  where every category named by the layout is detected at least once, class level, boxes ignored); and, per
  layout object, colour recall (some detection has its colour) and shape accuracy given colour (among objects
  whose colour is found, some detection of that colour has its shape): they separate "draws the right colours"
  from "draws the right shapes" when caption accuracy is low.
- evaluate_keypoints: PCK@0.1 (a labelled joint is correct when within 0.1 x max(w, h) of the ground-truth
  person's keypoint box; persons matched one-to-one by mean joint distance, an unmatched person scores 0 for all
  its joints) and COCO-style keypoint AP over OKS thresholds 0.5:0.05:0.95 (pycocotools COCOeval, COCO sigmas,
  object area = area of the keypoint box in pixels, since stick figures have no segmentation area).
"""

from __future__ import annotations

import contextlib
import io
from typing import NamedTuple

import numpy as np
from scipy.ndimage import binary_dilation, label
from scipy.optimize import linear_sum_assignment

from gligen.toy.world import (
    COLOURS,
    KEYPOINT_COLOURS,
    LIMB_COLOUR,
    PALETTE,
    keypoint_blob_size,
    match_shape,
    tight_box,
)

# Max RGB distance of a pixel to the palette colour it is nearest to. Object colours are >= 255 apart, joint colours
# >= 127 (the nearest-colour rule separates them; the distance only rejects far-off mixtures). 100 keeps 2-px joint
# blobs readable under a Gaussian blur of sigma 0.5 (60 did not).
COLOUR_DISTANCE = 100.0
MIN_OBJECT_FRACTION = 0.01  # components below 1% of the image are noise (smallest toy object: ~3%)
EIGHT = np.ones((3, 3), dtype=bool)
COCO_SIGMAS = np.array([.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89]) / 10


class Detection(NamedTuple):
    category: str
    colour: str
    shape: str
    box: tuple[float, float, float, float]  # normalised xyxy
    score: float


# ------------------------------------------------------------------------------------------------- colour maps


def nearest_colour_map(image: np.ndarray, colours: np.ndarray,
                       max_distance: float) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest colour per pixel (-1 when farther than max_distance), and that distance."""
    pixels = image.astype(np.float32)[..., None, :]  # [H, W, 1, 3]
    dist = np.linalg.norm(pixels - colours.astype(np.float32), axis=-1)  # [H, W, K]
    index = dist.argmin(axis=-1)
    best = np.take_along_axis(dist, index[..., None], axis=-1)[..., 0]
    index[best > max_distance] = -1
    return index, best


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components as boolean masks, largest first."""
    labels, n = label(mask, structure=EIGHT)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    return [labels == i + 1 for i in np.argsort(-sizes, kind="stable")]


# ----------------------------------------------------------------------------------------------------- objects


def as_rgb(image) -> np.ndarray:
    """uint8 [H, W, 3] view of an RGB array or PIL image (alpha dropped)."""
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] < 3:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {array.dtype} {array.shape}")
    return array[..., :3]


def detect_objects(image, colour_distance: float = COLOUR_DISTANCE,
                   min_fraction: float = MIN_OBJECT_FRACTION) -> list[Detection]:
    """Detections (category, colour, shape, normalised xyxy box, score), best score first."""
    image = as_rgb(image)
    h, w = image.shape[:2]
    # Black is a class too, so dark noisy pixels go to the background instead of the nearest colour.
    colours = np.array([(0, 0, 0)] + [PALETTE[c] for c in COLOURS])
    index, dist = nearest_colour_map(image, colours, colour_distance)
    min_pixels = max(2, round(min_fraction * h * w))
    detections = []
    for ci, colour in enumerate(COLOURS, start=1):
        for comp in _components(index == ci):
            size = int(comp.sum())
            if size < min_pixels:
                break  # sorted largest first
            x0, y0, x1, y1 = tight_box(comp)
            shape, shape_iou = match_shape(comp[y0:y1, x0:x1])
            purity = float(1.0 - dist[comp].mean() / colour_distance)
            size_factor = min(1.0, size / (3 * min_pixels))
            detections.append(Detection(category=f"{colour} {shape}", colour=colour, shape=shape,
                                        box=(x0 / w, y0 / h, x1 / w, y1 / h),
                                        score=purity * shape_iou * size_factor))
    return sorted(detections, key=lambda d: -d.score)


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _layout_objects(layout: dict) -> list[tuple[str, tuple[float, float, float, float]]]:
    return [(o["category"], tuple(o["box"])) for o in layout["objects"]]


def as_box_detections(detections: list[list[Detection]]) -> list[list[dict]]:
    """Toy detections in the generic detector format of gligen.metrics.grounding (label = category)."""
    return [[{"box": d.box, "label": d.category, "score": d.score} for d in dets] for dets in detections]


def mean_best_iou(detections: list[list[Detection]], layouts: list[dict]) -> float:
    """Mean over all layout objects of the best IoU of a same-category detection (0 if none)."""
    from gligen.metrics.grounding import miou  # lazy: gligen.metrics.grounding builds on this module

    return miou(as_box_detections(detections), layouts)


def count_accuracy(detections: list[list[Detection]], layouts: list[dict]) -> float:
    return float(np.mean([len(d) == len(l["objects"]) for d, l in zip(detections, layouts)]))


def caption_accuracy(detections: list[list[Detection]], layouts: list[dict]) -> float:
    """Images where every category the layout names is detected (class level; boxes ignored)."""
    hits = [{c for c, _ in _layout_objects(l)} <= {d.category for d in dets} for dets, l in zip(detections, layouts)]
    return float(np.mean(hits))


def attribute_accuracy(detections: list[list[Detection]], layouts: list[dict]) -> dict[str, float]:
    """Per layout object (boxes ignored): colour recall, and shape accuracy among objects whose colour is found."""
    objects = found = right_shape = 0
    for dets, layout in zip(detections, layouts):
        for category, _ in _layout_objects(layout):
            colour, shape = category.split(" ", 1)
            shapes = {d.shape for d in dets if d.colour == colour}
            objects += 1
            found += bool(shapes)
            right_shape += shape in shapes
    return {"colour_recall": found / max(objects, 1), "shape_accuracy_given_colour": right_shape / max(found, 1)}


def box_average_precision(detections: list[list[Detection]], layouts: list[dict]) -> dict[str, float]:
    """COCO AP / AP50 / AP75 of detections against the layouts (labels = category)."""
    from gligen.metrics.grounding import grounding_ap

    return grounding_ap(as_box_detections(detections), layouts)


def evaluate_boxes(images: list[np.ndarray], layouts: list[dict]) -> dict[str, float]:
    """Grounding accuracy of generated `images` against the layouts (annotation dicts) they were asked for."""
    from gligen.metrics.grounding import ToyDetector, coarse_grounding_metrics

    detections = [detect_objects(im) for im in images]
    return {**box_average_precision(detections, layouts),
            "miou": mean_best_iou(detections, layouts),
            **coarse_grounding_metrics(as_box_detections(detections), layouts, ToyDetector.coarse_label),
            "count_accuracy": count_accuracy(detections, layouts),
            "caption_accuracy": caption_accuracy(detections, layouts),
            **attribute_accuracy(detections, layouts)}


# --------------------------------------------------------------------------------------------------- keypoints


def _person_masks(index: np.ndarray, resolution: int) -> list[np.ndarray]:
    """Foreground (any non-background colour) components after a small dilation that joins a figure's parts."""
    foreground = index > 0
    joined = binary_dilation(foreground, structure=EIGHT, iterations=keypoint_blob_size(resolution))
    min_pixels = 0.01 * index.size
    return [m & foreground for m in _components(joined) if (m & foreground).sum() >= min_pixels]


def detect_persons(image) -> tuple[np.ndarray, np.ndarray]:
    """Keypoints [P, 17, 3] (normalised x, y; v = 2 found, 0 missing) ordered left to right, and scores [P]
    (fraction of joints found)."""
    image = as_rgb(image)
    h, w = image.shape[:2]
    colours = np.array([(0, 0, 0), LIMB_COLOUR] + list(KEYPOINT_COLOURS))  # 0: background, 1: limbs, 2+: joints
    # Figure vs background by nearest colour alone (noisy background stays background); a pixel counts for a
    # joint only when it is also close to that joint's colour (blurred mixtures belong to the figure, not a joint).
    nearest, dist = nearest_colour_map(image, colours, np.inf)
    persons, scores = [], []
    for person in _person_masks(nearest, max(h, w)):
        kps = np.zeros((17, 3))
        for k in range(17):
            comps = _components(person & (nearest == k + 2) & (dist <= COLOUR_DISTANCE))
            if comps:
                ys, xs = np.nonzero(comps[0])
                kps[k] = ((xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h, 2)
        found = kps[:, 2] > 0
        if found.any():
            persons.append(kps)
            scores.append(found.mean())
    if not persons:
        return np.zeros((0, 17, 3)), np.zeros(0)
    order = np.argsort([p[p[:, 2] > 0, 0].mean() for p in persons], kind="stable")
    return np.stack(persons)[order], np.array(scores)[order]


def detect_person_boxes(image) -> list[dict]:
    """Class-agnostic figure placement: one "person" box detection (normalised xyxy, score = the figure's share of
    the image) per foreground figure, whatever its joint colours. The keypoint analogue of the colour-only
    `coarse_*` box metrics: it asks whether a figure stands where the layout's person is, not which joint is which."""
    image = as_rgb(image)
    h, w = image.shape[:2]
    colours = np.array([(0, 0, 0), LIMB_COLOUR] + list(KEYPOINT_COLOURS))
    nearest, _ = nearest_colour_map(image, colours, np.inf)
    detections = []
    for person in _person_masks(nearest, max(h, w)):
        x0, y0, x1, y1 = tight_box(person)
        detections.append({"box": (x0 / w, y0 / h, x1 / w, y1 / h), "label": "person",
                           "score": float(person.sum() / person.size)})
    return detections


def person_box_layout(layout: dict) -> dict:
    """The layout with each person as a "person" object whose box is the box of its labelled keypoints."""
    objects = [{"box": _keypoint_box(kps), "category": "person", "phrase": "person"}
               for kps in _layout_persons(layout) if (kps[:, 2] > 0).any()]
    return {**layout, "objects": objects}


def detect_keypoints(image) -> np.ndarray:
    """[P, 17, 3]: normalised x, y and v (2 = found, 0 = missing), one row per detected person, left to right."""
    return detect_persons(image)[0]


def _keypoint_box(kps: np.ndarray) -> tuple[float, float, float, float]:
    """Normalised xyxy box of the labelled keypoints."""
    xy = kps[kps[:, 2] > 0, :2]
    return float(xy[:, 0].min()), float(xy[:, 1].min()), float(xy[:, 0].max()), float(xy[:, 1].max())


def _layout_persons(layout: dict) -> np.ndarray:
    return np.array([p["keypoints"] for p in layout.get("persons") or []], dtype=np.float64).reshape(-1, 17, 3)


def pck(predicted: list[np.ndarray], layouts: list[dict], threshold: float = 0.1) -> float:
    """Fraction of labelled ground-truth joints within threshold x max(w, h) of their person's keypoint box.

    Persons are matched one-to-one (Hungarian, mean distance over joints found in both); the joints of an
    unmatched ground-truth person, and joints the matched prediction misses, count as wrong.
    """
    correct, total = 0, 0
    for pred, layout in zip(predicted, layouts):
        gts = _layout_persons(layout)
        for gt in gts:
            total += int((gt[:, 2] > 0).sum())
        if len(gts) == 0 or len(pred) == 0:
            continue
        cost = np.array([[_mean_joint_distance(g, p) for p in pred] for g in gts])
        for gi, pi in zip(*linear_sum_assignment(cost)):
            gt, p = gts[gi], pred[pi]
            x0, y0, x1, y1 = _keypoint_box(gt)
            scale = max(x1 - x0, y1 - y0)
            both = (gt[:, 2] > 0) & (p[:, 2] > 0)
            dist = np.linalg.norm(gt[:, :2] - p[:, :2], axis=-1)
            correct += int((both & (dist <= threshold * scale)).sum())
    return correct / total if total else 0.0


def _mean_joint_distance(gt: np.ndarray, pred: np.ndarray) -> float:
    both = (gt[:, 2] > 0) & (pred[:, 2] > 0)
    return float(np.linalg.norm(gt[both, :2] - pred[both, :2], axis=-1).mean()) if both.any() else 1e3


def keypoint_average_precision(predicted: list[np.ndarray], scores: list[np.ndarray],
                               layouts: list[dict]) -> dict[str, float]:
    """COCO keypoint AP / AP50 / AP75 (OKS thresholds 0.5:0.05:0.95) via pycocotools, pixel coordinates."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, gt_anns, dt_anns = [], [], []
    for image_id, (pred, score, layout) in enumerate(zip(predicted, scores, layouts)):
        w, h = layout["width"], layout["height"]
        images.append({"id": image_id, "width": w, "height": h})
        to_pixels = np.array([w, h, 1.0])
        for gt in _layout_persons(layout):
            x0, y0, x1, y1 = _keypoint_box(gt)
            box = [x0 * w, y0 * h, (x1 - x0) * w, (y1 - y0) * h]
            gt_anns.append({"id": len(gt_anns) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                            "keypoints": (gt * to_pixels).ravel().tolist(), "num_keypoints": int((gt[:, 2] > 0).sum()),
                            "bbox": box, "area": max(box[2] * box[3], 1.0)})
        for p, s in zip(pred, score):
            dt_anns.append({"image_id": image_id, "category_id": 1, "keypoints": (p * to_pixels).ravel().tolist(),
                            "score": float(s)})
    if not gt_anns:
        return {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and tables
        gt_coco = COCO()
        gt_coco.dataset = {"images": images, "annotations": gt_anns,
                           "categories": [{"id": 1, "name": "person", "keypoints": [], "skeleton": []}]}
        gt_coco.createIndex()
        if not dt_anns:
            return {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
        dt_coco = gt_coco.loadRes(dt_anns)
        evaluator = COCOeval(gt_coco, dt_coco, iouType="keypoints")
        evaluator.params.kpt_oks_sigmas = COCO_SIGMAS
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    ap, ap50, ap75 = (max(0.0, float(v)) for v in evaluator.stats[:3])
    return {"ap": ap, "ap50": ap50, "ap75": ap75}


def evaluate_keypoints(images: list[np.ndarray], layouts: list[dict]) -> dict[str, float]:
    """PCK@0.1 and OKS keypoint AP of generated person `images` against the layouts they were asked for, and the
    class-agnostic figure placement person_ap50 / person_miou (`detect_person_boxes`)."""
    from gligen.metrics.grounding import person_placement_metrics  # lazy: that module builds on this one

    detected = [detect_persons(im) for im in images]
    predicted = [kps for kps, _ in detected]
    aps = keypoint_average_precision(predicted, [s for _, s in detected], layouts)
    return {"pck": pck(predicted, layouts), **{f"oks_{k}": v for k, v in aps.items()},
            **person_placement_metrics([detect_person_boxes(im) for im in images], layouts)}


# ----------------------------------------------------------------------------------------------- layouts


def toy_layouts(modality: str, num: int, resolution: int | None = None, split: str = "val", seed: int = 0
                ) -> tuple[list[dict], list[np.ndarray]]:
    """`num` evaluation layouts of the toy world for a grounding modality, and their real images (uint8 HxWx3).

    Straight from the world's generator (the same samples as the split's shards): box / image / text_image use
    object scenes (every object carries its reference `entity_image`, a PIL image of the same category drawn
    alone), keypoint uses person scenes (`persons`, normalised, v = 2). Layout fields: key, caption, width, height,
    objects, persons.
    """
    import io as _io

    from PIL import Image

    from gligen.toy.world import make_sample

    family = "persons" if modality == "keypoint" else "objects"
    layouts, references = [], []
    for index in range(num):
        sample = make_sample(split, index, kind="grounding", family=family, resolution=resolution, seed=seed)
        ann = sample["json"]
        objects = []
        for obj in ann["objects"]:
            entry = {"box": obj["box"], "phrase": obj["phrase"], "category": obj["category"]}
            if obj.get("entity_image") and obj["entity_image"] in sample:
                with Image.open(_io.BytesIO(sample[obj["entity_image"]]), formats=["JPEG", "PNG", "WEBP"]) as image:
                    entry["entity_image"] = image.convert("RGB")
            objects.append(entry)
        layout = {"key": sample["__key__"], "caption": sample["txt"], "width": ann["width"],
                  "height": ann["height"], "objects": objects}
        if ann.get("persons"):
            layout["persons"] = ann["persons"]
        layouts.append(layout)
        with Image.open(_io.BytesIO(sample["png"]), formats=["PNG"]) as image:
            references.append(np.asarray(image.convert("RGB")))
    return layouts, references
