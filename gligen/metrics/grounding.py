"""Grounding accuracy: run a detector on generated images and score its boxes against the input layout.

This is the paper's "YOLO score" (COCO AP / AP50 / AP75 of YOLOv4 detections on images generated from COCO val
layouts) with the detector made pluggable: anything satisfying `Detector` works. Provided:

- "toy" (`gligen.metrics.detectors`): the toy world's exact rule-based read-back (``gligen.toy.evaluate``); label =
  category ("red square").
- `TransformersDetector` (gligen.metrics.transformers_detector): any ``transformers`` object-detection model (DETR,
  Deformable DETR, YOLOS, RT-DETR, ...) from a local directory or hub id the user supplies; labels come from
  ``model.config.id2label``, optionally renamed by a `label_map` onto the layout's vocabulary. (YOLOv4 itself is
  not a transformers model; numbers from another detector are comparable with each other, not with the paper's.)

Detections are dicts {"box": normalised xyxy, "label": str, "score": float}. Layouts are annotation dicts of the
project's schema ({"objects": [{"box", "phrase", "category"}, ...]}); an object's target label is its category when
set, else its phrase (`target_label`; pass `label_of` to change it). Labels match by exact string equality.

Other modalities:
- keypoints: a `PoseDetector` maps images to per-image keypoints [P, 17, 3] (normalised x, y, v; v > 0 = found),
  the output of ``gligen.toy.evaluate.detect_keypoints``, optionally as a (keypoints, scores [P]) pair;
  "toy_pose" is the toy's exact read-back. `keypoint_metrics`: PCK@0.1 and OKS keypoint AP against the
  layout's persons (``gligen.metrics.keypoints``), and person placement
  (`person_ap50` / `person_miou`: "person" boxes, from a box detector such as "toy_person" or from the pose
  detector's joints, against each person's keypoint box).
- image entities: `entity_grounding_metrics` scores box detections against the boxes with the label of each object's
  REFERENCE image (`entity_label`: entity_category, else category, else phrase), so a model that draws the
  reference's class in the box scores, whatever its phrase said.

Metrics (plain floats): `grounding_ap` (torchmetrics MeanAveragePrecision, COCO protocol: 101-point interpolation,
IoU 0.5:0.05:0.95, at most 100 detections per image, classes without ground truth ignored) and `miou` (mean over
layout objects of the best IoU of a same-label detection, 0 when there is none).
"""

from __future__ import annotations

import contextlib
import io
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, TypedDict

import numpy as np
import torch

from gligen.metrics.keypoints import (
    keypoint_ap_records,
    keypoint_average_precision,
    keypoint_cocoeval,
    pck,
    pck_counts,
    person_box_layout,
)
from gligen.metrics.resample import APRecords, MeanRecords, RowRecords

Box = tuple[float, float, float, float]


def as_rgb(image) -> np.ndarray:
    """uint8 [H, W, 3] view of an RGB array or PIL image (alpha dropped)."""
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] < 3:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {array.dtype} {array.shape}")
    return array[..., :3]


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class BoxDetection(TypedDict):
    box: Box  # normalised xyxy
    label: str
    score: float


class Detector(Protocol):
    def __call__(self, images: list[np.ndarray]) -> list[list[BoxDetection]]:
        """Detections per image (uint8 HxWx3 RGB arrays in, one list of detections out per image)."""
        ...


def target_label(obj: Mapping) -> str:
    """The label a detection must carry to match a layout object: its category if set, else its phrase."""
    return obj.get("category") or obj["phrase"]


LabelOf = Callable[[Mapping], str]


def entity_label(obj: Mapping) -> str:
    """The class an image-entity object must show: its reference image's class (`entity_category`; on the toy the
    entity image is the object's own category), else its category, else its phrase."""
    return obj.get("entity_category") or obj.get("category") or obj["phrase"]


class PoseDetector(Protocol):
    def __call__(self, images: list[np.ndarray]) -> list:
        """Per image: keypoints [P, 17, 3] (normalised x, y; v > 0 = found), or a (keypoints, scores [P]) pair."""
        ...


# ------------------------------------------------------------------------------------------------------ metrics


def _check_pairs(detections: Sequence, layouts: Sequence) -> None:
    if len(detections) != len(layouts):
        raise ValueError(f"{len(detections)} detection lists for {len(layouts)} layouts: need one per layout")


def label_ids(detections: Sequence[Sequence[BoxDetection]], layouts: Sequence[Mapping],
              label_of: LabelOf = target_label) -> dict[str, int]:
    """One integer id per label over predictions and targets together (so equal strings get equal ids)."""
    labels = {d["label"] for dets in detections for d in dets}
    labels |= {label_of(obj) for layout in layouts for obj in layout["objects"]}
    return {label: i for i, label in enumerate(sorted(labels))}


def _boxes(boxes: list) -> torch.Tensor:
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def stable_label_id(label: str) -> int:
    """The same integer for the same label in every process (ranks build their label sets independently)."""
    return zlib.crc32(label.encode("utf-8")) & 0x7FFFFFFF


def map_inputs(detections: Sequence[Sequence[BoxDetection]], layouts: Sequence[Mapping],
               label_id: Callable[[str], int], label_of: LabelOf = target_label) -> tuple[list[dict], list[dict]]:
    """torchmetrics MeanAveragePrecision `update` arguments: per image, detections vs the layout's objects."""
    _check_pairs(detections, layouts)
    preds, targets = [], []
    for dets, layout in zip(detections, layouts):
        preds.append({"boxes": _boxes([list(d["box"]) for d in dets]),
                      "scores": torch.tensor([float(d["score"]) for d in dets], dtype=torch.float32),
                      "labels": torch.tensor([label_id(d["label"]) for d in dets], dtype=torch.long)})
        targets.append({"boxes": _boxes([list(obj["box"]) for obj in layout["objects"]]),
                        "labels": torch.tensor([label_id(label_of(obj)) for obj in layout["objects"]],
                                               dtype=torch.long)})
    return preds, targets


def ap_summary(result: Mapping) -> dict[str, float]:
    """AP / AP50 / AP75 from MeanAveragePrecision.compute(); torchmetrics' -1 (no ground truth at all) becomes 0
    so averages stay meaningful."""
    return {name: max(0.0, float(result[key])) for name, key in (("ap", "map"), ("ap50", "map_50"), ("ap75", "map_75"))}


def grounding_ap(detections: Sequence[Sequence[BoxDetection]], layouts: Sequence[Mapping],
                 label_of: LabelOf = target_label) -> dict[str, float]:
    """COCO AP / AP50 / AP75 of per-image detections against the layouts the images were generated from.

    Boxes stay normalised: AP over all object sizes does not depend on the image scale (only COCO's small /
    medium / large breakdown would, and it is not reported).
    """
    from torchmetrics.detection import MeanAveragePrecision

    ids = label_ids(detections, layouts, label_of)
    preds, targets = map_inputs(detections, layouts, ids.__getitem__, label_of)
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
    metric.update(preds, targets)
    return ap_summary(metric.compute())


def ap_records(detections: Sequence[Sequence[BoxDetection]], layouts: Sequence[Mapping],
               label_of: LabelOf = target_label) -> APRecords:
    """`grounding_ap`'s matches kept per image (gligen.metrics.resample), for resampling layouts: the COCO datasets
    torchmetrics builds from the same inputs (float32 xywh boxes, ids from 1, every label a category, its IoU and
    recall thresholds and detection cap), matched by pycocotools' own `evaluate`."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    from torchmetrics.detection import MeanAveragePrecision
    from torchvision.ops import box_convert

    protocol = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
    ids = label_ids(detections, layouts, label_of)
    preds, targets = map_inputs(detections, layouts, ids.__getitem__, label_of)

    def dataset(items: list[dict], scored: bool) -> COCO:
        annotations = []
        for image_id, item in enumerate(items):
            boxes = box_convert(item["boxes"], "xyxy", "xywh").tolist() if len(item["boxes"]) else []
            for k, (box, label) in enumerate(zip(boxes, item["labels"].tolist())):
                annotation = {"id": len(annotations) + 1, "image_id": image_id, "area": box[2] * box[3],
                              "category_id": label, "iscrowd": 0, "bbox": box}
                if scored:
                    annotation["score"] = item["scores"][k].tolist()
                annotations.append(annotation)
        coco = COCO()
        coco.dataset = {"images": [{"id": i} for i in range(len(items))], "annotations": annotations,
                        "categories": [{"id": i, "name": str(i)} for i in sorted(ids.values())]}
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco

    evaluator = COCOeval(dataset(targets, False), dataset(preds, True), iouType="bbox")
    evaluator.params.iouThrs = np.array(protocol.iou_thresholds, dtype=np.float64)
    evaluator.params.recThrs = np.array(protocol.rec_thresholds, dtype=np.float64)
    evaluator.params.maxDets = list(protocol.max_detection_thresholds)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
    return APRecords.from_cocoeval(evaluator)


def _best_ious(detections: Sequence[Sequence[BoxDetection]], layouts: Sequence[Mapping],
               label_of: LabelOf = target_label) -> list[list[float]]:
    """Per image, per layout object: the best IoU of a same-label detection in its image (0 if none)."""
    _check_pairs(detections, layouts)
    return [[max([box_iou(obj["box"], d["box"]) for d in dets if d["label"] == label_of(obj)], default=0.0)
             for obj in layout["objects"]] for dets, layout in zip(detections, layouts)]


def miou_records(detections: Sequence[Sequence[BoxDetection]], layouts: Sequence[Mapping],
                 label_of: LabelOf = target_label) -> MeanRecords:
    """`miou` as per-image sums and object counts, for resampling layouts."""
    ious = _best_ious(detections, layouts, label_of)
    return MeanRecords([sum(image) for image in ious], [len(image) for image in ious])


def box_records(detections: Sequence[Sequence[BoxDetection]], layouts: Sequence[Mapping], records: RowRecords,
                prefix: str = "", label_of: LabelOf = target_label, coarse: Callable[[str], str] | None = None
                ) -> None:
    """Adds the layout records of `box_grounding_metrics` / `entity_grounding_metrics` (names with `prefix`)."""
    records.add(f"{prefix}ap", ap_records(detections, layouts, label_of),
                {f"{prefix}ap": "ap", f"{prefix}ap50": "ap50", f"{prefix}ap75": "ap75"})
    records.add(f"{prefix}miou", miou_records(detections, layouts, label_of), {f"{prefix}miou": "mean"})
    if coarse is not None:
        coarse_detections, coarse_of = coarse_inputs(detections, coarse, label_of)
        records.add(f"{prefix}coarse_ap", ap_records(coarse_detections, layouts, coarse_of),
                    {f"{prefix}coarse_ap50": "ap50"})
        records.add(f"{prefix}coarse_miou", miou_records(coarse_detections, layouts, coarse_of),
                    {f"{prefix}coarse_miou": "mean"})


def coarse_inputs(detections: Sequence[Sequence[BoxDetection]], coarse: Callable[[str], str],
                  label_of: LabelOf = target_label) -> tuple[list[list[BoxDetection]], LabelOf]:
    """Detections and the layout's label function with every label mapped through `coarse`."""
    return ([[{**d, "label": coarse(d["label"])} for d in dets] for dets in detections],
            lambda obj: coarse(label_of(obj)))


def coarse_grounding_metrics(detections: Sequence[Sequence[BoxDetection]], layouts: Sequence[Mapping],
                             coarse: Callable[[str], str], label_of: LabelOf = target_label) -> dict[str, float]:
    """AP50 and mIoU with every label (detections and layout targets) mapped through `coarse`."""
    coarse_detections, coarse_of = coarse_inputs(detections, coarse, label_of)
    ap = grounding_ap(coarse_detections, layouts, coarse_of)
    return {"coarse_ap50": ap["ap50"], "coarse_miou": miou(coarse_detections, layouts, coarse_of)}


def miou(detections: Sequence[Sequence[BoxDetection]], layouts: Sequence[Mapping],
         label_of: LabelOf = target_label) -> float:
    """Mean over all layout objects of the best IoU of a same-label detection in its image (0 if none)."""
    ious = [iou for image in _best_ious(detections, layouts, label_of) for iou in image]
    return float(np.mean(ious)) if ious else 0.0


def split_pose_output(outputs: Sequence) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """PoseDetector output -> (keypoints [P, 17, 3] per image, scores [P] per image; default: fraction found)."""
    keypoints, scores = [], []
    for out in outputs:
        if isinstance(out, tuple):
            kps, score = out
        else:
            kps, score = out, None
        kps = np.asarray(kps, dtype=np.float64).reshape(-1, 17, 3)
        keypoints.append(kps)
        scores.append((kps[..., 2] > 0).mean(-1) if score is None else np.asarray(score, dtype=np.float64))
    return keypoints, scores


def _with_size(layouts: Sequence[Mapping], images: Sequence[np.ndarray]) -> list[dict]:
    """Layouts with the image's width / height when they lack them (OKS needs pixel scales)."""
    return [{**layout, "width": layout.get("width") or image.shape[1], "height": layout.get("height") or image.shape[0]}
            for layout, image in zip(layouts, images)]


def person_placement_metrics(person_detections: Sequence[Sequence[BoxDetection]], layouts: Sequence[Mapping],
                             records: RowRecords | None = None) -> dict[str, float]:
    """Class-agnostic person placement: AP50 and mIoU of "person" boxes against the box of each layout person's
    labelled keypoints (`person_ap50`, `person_miou`): whether a figure stands where each person was asked for,
    whatever its joints look like (the keypoint analogue of the colour-only `coarse_*` box metrics).
    `records`: filled with their layout records (gligen.metrics.resample)."""
    targets = [person_box_layout(dict(layout)) for layout in layouts]
    if records is not None:
        records.add("person_ap", ap_records(person_detections, targets), {"person_ap50": "ap50"})
        records.add("person_miou", miou_records(person_detections, targets), {"person_miou": "mean"})
    return {"person_ap50": grounding_ap(person_detections, targets)["ap50"],
            "person_miou": miou(person_detections, targets)}


def keypoints_as_person_boxes(keypoints: Sequence[np.ndarray], scores: Sequence[np.ndarray]
                              ) -> list[list[BoxDetection]]:
    """A pose detector's persons as "person" boxes: the box of each person's found joints."""
    out = []
    for kps, score in zip(keypoints, scores):
        dets = []
        for person, s in zip(kps, score):
            xy = person[person[:, 2] > 0, :2]
            if len(xy):
                dets.append({"box": (*xy.min(0).tolist(), *xy.max(0).tolist()), "label": "person", "score": float(s)})
        out.append(dets)
    return out


def keypoint_metrics(images: list[np.ndarray], layouts: Sequence[Mapping], detector: PoseDetector,
                     threshold: float = 0.1, person_detector: Detector | None = None,
                     records: RowRecords | None = None) -> dict[str, float]:
    """PCK@threshold (`pck`) and OKS keypoint AP (`oks_ap`, `oks_ap50`, `oks_ap75`) of the detector's persons on
    `images` against the layouts' persons, and person placement (`person_ap50`, `person_miou`) of
    `person_detector`'s "person" boxes (default: the box of each detected person's found joints).
    `records`: filled with their layout records (gligen.metrics.resample)."""
    _check_pairs(images, layouts)
    keypoints, scores = split_pose_output(detector(images))
    _check_pairs(keypoints, layouts)
    sized = _with_size(layouts, images)
    evaluator = keypoint_cocoeval(keypoints, scores, sized)  # one OKS matching for the AP and its records
    aps = keypoint_average_precision(keypoints, scores, sized, evaluator)
    persons = person_detector(images) if person_detector is not None else keypoints_as_person_boxes(keypoints, scores)
    if records is not None:
        records.add("pck", MeanRecords(*pck_counts(keypoints, sized, threshold)), {"pck": "mean"})
        records.add("oks_ap", keypoint_ap_records(keypoints, scores, sized, evaluator),
                    {"oks_ap": "ap", "oks_ap50": "ap50", "oks_ap75": "ap75"})
    return {"pck": pck(keypoints, sized, threshold), **{f"oks_{k}": v for k, v in aps.items()},
            **person_placement_metrics(persons, layouts, records)}


def box_grounding_metrics(images: list[np.ndarray], layouts: Sequence[Mapping], detector: Detector,
                          records: RowRecords | None = None) -> dict[str, float]:
    """Box grounding: AP / AP50 / AP75 and mIoU of the detector's findings on `images` against their input layouts;
    with a detector that has `coarse_label` (the toy's: colour), also coarse_ap50 / coarse_miou on coarse labels.
    `records`: filled with their layout records (gligen.metrics.resample)."""
    detections = detector(images)
    if records is not None:
        box_records(detections, layouts, records, coarse=getattr(detector, "coarse_label", None))
    metrics = {**grounding_ap(detections, layouts), "miou": miou(detections, layouts)}
    if hasattr(detector, "coarse_label"):
        metrics.update(coarse_grounding_metrics(detections, layouts, detector.coarse_label))
    return metrics


def entity_grounding_metrics(images: list[np.ndarray], layouts: Sequence[Mapping], detector: Detector,
                             records: RowRecords | None = None) -> dict[str, float]:
    """Image-entity grounding: AP / AP50 / AP75 / mIoU of the detector's boxes against the layout boxes labelled
    with the reference image's class (`entity_label`), reported as entity_ap, entity_ap50, entity_ap75,
    entity_miou. Objects without an entity image still count (label: category, else phrase). With a detector that
    has `coarse_label` (the toy's: colour), also entity_coarse_ap50 / entity_coarse_miou on coarse labels.
    `records`: filled with their layout records (gligen.metrics.resample)."""
    detections = detector(images)
    if records is not None:
        box_records(detections, layouts, records, "entity_", entity_label, getattr(detector, "coarse_label", None))
    ap = grounding_ap(detections, layouts, entity_label)
    metrics = {**{f"entity_{k}": v for k, v in ap.items()}, "entity_miou": miou(detections, layouts, entity_label)}
    if hasattr(detector, "coarse_label"):
        coarse = coarse_grounding_metrics(detections, layouts, detector.coarse_label, entity_label)
        metrics.update({f"entity_{k}": v for k, v in coarse.items()})
    return metrics
