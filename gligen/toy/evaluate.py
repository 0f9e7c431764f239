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

import io
from typing import NamedTuple

import numpy as np
from PIL import Image
from scipy.ndimage import binary_dilation, label

from gligen.metrics.grounding import as_rgb, coarse_grounding_metrics, grounding_ap, miou, person_placement_metrics
from gligen.metrics.keypoints import keypoint_average_precision, pck
from gligen.toy.world import (
    COLOURS,
    KEYPOINT_COLOURS,
    LIMB_COLOUR,
    PALETTE,
    keypoint_blob_size,
    make_sample,
    match_shape,
    tight_box,
)

# Max RGB distance of a pixel to the palette colour it is nearest to. Object colours are >= 255 apart, joint colours
# >= 127 (the nearest-colour rule separates them; the distance only rejects far-off mixtures). 100 keeps 2-px joint
# blobs readable under a Gaussian blur of sigma 0.5 (60 did not).
COLOUR_DISTANCE = 100.0
MIN_OBJECT_FRACTION = 0.01  # components below 1% of the image are noise (smallest toy object: ~3%)
EIGHT = np.ones((3, 3), dtype=bool)


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


def _layout_objects(layout: dict) -> list[tuple[str, tuple[float, float, float, float]]]:
    return [(o["category"], tuple(o["box"])) for o in layout["objects"]]


def as_box_detections(detections: list[list[Detection]]) -> list[list[dict]]:
    """Toy detections in the generic detector format of gligen.metrics.grounding (label = category)."""
    return [[{"box": d.box, "label": d.category, "score": d.score} for d in dets] for dets in detections]


def mean_best_iou(detections: list[list[Detection]], layouts: list[dict]) -> float:
    """Mean over all layout objects of the best IoU of a same-category detection (0 if none)."""
    return miou(as_box_detections(detections), layouts)


def count_accuracy(detections: list[list[Detection]], layouts: list[dict]) -> float:
    return float(np.mean([len(d) == len(layout["objects"]) for d, layout in zip(detections, layouts)]))


def caption_accuracy(detections: list[list[Detection]], layouts: list[dict]) -> float:
    """Images where every category the layout names is detected (class level; boxes ignored)."""
    hits = [{c for c, _ in _layout_objects(layout)} <= {d.category for d in dets}
            for dets, layout in zip(detections, layouts)]
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
    return grounding_ap(as_box_detections(detections), layouts)


def evaluate_boxes(images: list[np.ndarray], layouts: list[dict]) -> dict[str, float]:
    """Grounding accuracy of generated `images` against the layouts (annotation dicts) they were asked for."""
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


def detect_keypoints(image) -> np.ndarray:
    """[P, 17, 3]: normalised x, y and v (2 = found, 0 = missing), one row per detected person, left to right."""
    return detect_persons(image)[0]


def evaluate_keypoints(images: list[np.ndarray], layouts: list[dict]) -> dict[str, float]:
    """PCK@0.1 and OKS keypoint AP of generated person `images` against the layouts they were asked for, and the
    class-agnostic figure placement person_ap50 / person_miou (`detect_person_boxes`)."""
    detected = [detect_persons(im) for im in images]
    predicted = [kps for kps, _ in detected]
    aps = keypoint_average_precision(predicted, [s for _, s in detected], layouts)
    return {"pck": pck(predicted, layouts), **{f"oks_{k}": v for k, v in aps.items()},
            **person_placement_metrics([detect_person_boxes(im) for im in images], layouts)}


# ----------------------------------------------------------------------------------------------- layouts


def toy_layouts(family: str, num: int, resolution: int | None = None, split: str = "val", seed: int = 0
                ) -> tuple[list[dict], list[np.ndarray]]:
    """`num` evaluation layouts of the toy world of a scene family, and their real images (uint8 HxWx3).

    Straight from the world's generator (the same samples as the split's shards): "objects" scenes (box / image /
    text_image; every object carries its reference `entity_image`, a PIL image of the same category drawn alone) or
    "persons" scenes (keypoint; `persons`, normalised, v = 2): a modality's `family`. Layout fields: key, caption,
    width, height, objects, persons.
    """
    layouts, references = [], []
    for index in range(num):
        sample = make_sample(split, index, kind="grounding", family=family, resolution=resolution, seed=seed)
        ann = sample["json"]
        objects = []
        for obj in ann["objects"]:
            entry = {"box": obj["box"], "phrase": obj["phrase"], "category": obj["category"]}
            if obj.get("entity_image") and obj["entity_image"] in sample:
                with Image.open(io.BytesIO(sample[obj["entity_image"]]), formats=["JPEG", "PNG", "WEBP"]) as image:
                    entry["entity_image"] = image.convert("RGB")
            objects.append(entry)
        layout = {"key": sample["__key__"], "caption": sample["txt"], "width": ann["width"],
                  "height": ann["height"], "objects": objects}
        if ann.get("persons"):
            layout["persons"] = ann["persons"]
        layouts.append(layout)
        with Image.open(io.BytesIO(sample["png"]), formats=["PNG"]) as image:
            references.append(np.asarray(image.convert("RGB")))
    return layouts, references


# ----------------------------------------------------------------------------------------------- detectors
# registered by name in gligen.metrics.detectors ("toy", "toy_pose", "toy_person")


class ToyDetector:
    """The toy world's exact rule-based detector (`detect_objects`); label = category.

    `coarse_label` maps a category to its colour: grounding_metrics then also scores placement by colour alone
    ("is the red thing in the red box"), which separates what GLIGEN learned (where) from how well the frozen base
    draws shapes (what).
    """

    @staticmethod
    def coarse_label(label: str) -> str:
        return label.split()[0]

    def __init__(self, colour_distance: float = COLOUR_DISTANCE, min_fraction: float = MIN_OBJECT_FRACTION):
        self.colour_distance = colour_distance
        self.min_fraction = min_fraction

    def __call__(self, images: list[np.ndarray]) -> list[list[dict]]:
        return [[{"box": d.box, "label": d.category, "score": d.score}
                 for d in detect_objects(image, self.colour_distance, self.min_fraction)] for image in images]


class ToyPoseDetector:
    """The toy world's exact stick-figure read-back (`detect_persons`): (keypoints, scores)."""

    def __call__(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        return [detect_persons(image) for image in images]


class ToyPersonDetector:
    """The toy world's class-agnostic figure read-back (`detect_person_boxes`): "person" boxes."""

    def __call__(self, images: list[np.ndarray]) -> list[list[dict]]:
        return [detect_person_boxes(image) for image in images]
