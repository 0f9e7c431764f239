"""`TransformersDetector`: any ``transformers`` object-detection model (DETR, Deformable DETR, YOLOS, RT-DETR, ...) as
a grounding `Detector` (gligen.metrics.grounding), from a local directory or a hub id the user supplies."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from gligen.metrics.grounding import BoxDetection, as_rgb


class TransformersDetector:
    """A transformers object detector (AutoImageProcessor + AutoModelForObjectDetection), e.g. a COCO DETR.

    label_map: renames the model's class names (``config.id2label``) to the layouts' labels, e.g.
    {"dining table": "table"}; names not in it are kept. threshold: detections scoring at or below it are dropped
    (0 keeps everything the model's post-processing returns, which is what AP wants: low-confidence detections
    only add recall). Weights must be local unless the hub is reachable.
    """

    def __init__(self, model_dir_or_id: str, label_map: Mapping[str, str] | None = None, threshold: float = 0.0,
                 device: str | torch.device | None = None, batch_size: int = 16):
        from transformers import AutoImageProcessor, AutoModelForObjectDetection

        self.processor = AutoImageProcessor.from_pretrained(model_dir_or_id)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = AutoModelForObjectDetection.from_pretrained(model_dir_or_id).to(self.device).eval()
        self.label_map = dict(label_map or {})
        self.threshold = threshold
        self.batch_size = batch_size

    def label_name(self, class_id: int) -> str:
        name = self.model.config.id2label[int(class_id)]
        return self.label_map.get(name, name)

    def __call__(self, images: list[np.ndarray]) -> list[list[BoxDetection]]:
        rgb = [as_rgb(image) for image in images]
        detections = []
        for start in range(0, len(rgb), self.batch_size):
            detections.extend(self._detect_batch(rgb[start:start + self.batch_size]))
        return detections

    @torch.inference_mode()
    def _detect_batch(self, images: list[np.ndarray]) -> list[list[BoxDetection]]:
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        sizes = [image.shape[:2] for image in images]  # (height, width): boxes come back in these pixels
        results = self.processor.post_process_object_detection(outputs, threshold=self.threshold,
                                                               target_sizes=sizes)
        return [self._to_detections(result, height, width) for result, (height, width) in zip(results, sizes)]

    def _to_detections(self, result: dict, height: int, width: int) -> list[BoxDetection]:
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        boxes = (result["boxes"].float().cpu() / scale).clamp(0.0, 1.0)
        detections = [BoxDetection(box=tuple(float(v) for v in box), label=self.label_name(label), score=float(score))
                      for box, label, score in zip(boxes, result["labels"].tolist(), result["scores"].tolist())]
        return sorted(detections, key=lambda d: -d["score"])
