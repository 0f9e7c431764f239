"""Keypoint grounding: up to `max_persons` persons x 17 COCO joints, one grounding token per joint slot."""

from __future__ import annotations

import numpy as np
import torch

from gligen.constants import MAX_OBJECTS, MAX_PERSONS, NUM_KEYPOINTS
from gligen.data.transforms import pad_keypoints
from gligen.metrics.detectors import make_detector
from gligen.metrics.grounding import keypoint_metrics
from gligen.modalities.base import Modality, fourier_freqs
from gligen.nn.tokenizers import GroundingInputError, KeypointTokenizer, check_keypoint_grounding


def layout_keypoints(layouts: list[dict], max_persons: int = MAX_PERSONS) -> tuple[torch.Tensor, torch.Tensor]:
    """Layouts' persons -> points [B, max_persons, 17, 2] and masks [B, max_persons, 17] (1 where v = 2), padded as
    the data pipeline pads them (`pad_keypoints`: the persons with most present joints first)."""
    points = torch.zeros(len(layouts), max_persons, NUM_KEYPOINTS, 2)
    masks = torch.zeros(len(layouts), max_persons, NUM_KEYPOINTS)
    for i, layout in enumerate(layouts):
        persons = layout.get("persons") or []
        kps = np.array([p["keypoints"] for p in persons], dtype=np.float64).reshape(-1, NUM_KEYPOINTS, 3)
        padded = pad_keypoints(kps, max_persons)
        points[i], masks[i] = padded["keypoints"], padded["keypoint_masks"]
    return points, masks


class KeypointModality(Modality):
    name = "keypoint"
    family = "persons"
    primary_metric = "pck"
    placement_metric = "person_ap50"  # figures where asked, joints ignored
    metric_names = ("pck", "oks_ap", "oks_ap50", "oks_ap75", "person_ap50", "person_miou")
    official_tokenizer = "keypoint_grounding_net"
    official_marker = "position_net.person_embeddings"

    def position_net(self, token_dim, text_dim, max_persons=MAX_PERSONS, position_encoding="fourier"):
        return KeypointTokenizer(in_dim=token_dim, out_dim=token_dim, max_persons=max_persons,
                                 position_encoding=position_encoding)

    def check_batch(self, batch, max_objects=MAX_OBJECTS, max_persons=MAX_PERSONS, *, user_layout=False):
        points, masks = batch["keypoints"].float(), batch["keypoint_masks"].float()
        if user_layout and not masks.flatten(1).any(1).all():
            i = int((~masks.flatten(1).any(1)).nonzero()[0])
            name = batch["keys"][i] if batch.get("keys") else f"layout {i}"
            raise GroundingInputError(f"{name}: a keypoint layout needs \"persons\" with present joints (v = 2)")
        check_keypoint_grounding(points, masks, batch.get("keys"), max_persons)

    def batch_inputs(self, ldm, batch, *, training=False, generator=None, check=True, max_objects=MAX_OBJECTS,
                     max_persons=MAX_PERSONS):
        if check:
            self.check_batch(batch, max_objects, max_persons)
        return {"points": batch["keypoints"].float(), "masks": batch["keypoint_masks"].float()}

    def layouts_batch(self, layouts, max_objects=MAX_OBJECTS, max_persons=MAX_PERSONS, ldm=None):
        points, masks = layout_keypoints(layouts, max_persons)
        return {"keypoints": points, "keypoint_masks": masks}

    def check_layouts(self, layouts, source):
        if not any(layout.get("persons") for layout in layouts):
            raise ValueError(f"{source}: no persons in these validation layouts; a keypoint checkpoint is scored on "
                             "person shards (e.g. the toy world's val-persons)")

    def detector(self, config):
        """`pose_detector`: "toy" / unset = the toy read-back, else "module:callable" (a PoseDetector)."""
        spec = config.get("pose_detector")
        return None if spec in (None, "toy") else make_detector(spec)

    def metrics(self, images, layouts, detector=None, records=None):
        if detector is None:
            return keypoint_metrics(images, layouts, make_detector("toy_pose"),
                                    person_detector=make_detector("toy_person"), records=records)
        return keypoint_metrics(images, layouts, detector, records=records)

    def diffusers_problems(self, position_net, width):
        return [f"modality is {self.name!r}; diffusers has no keypoint GLIGEN pipeline (keypoint models are written "
                "in this project's format instead, see `export_keypoint`)"]

    def official_position_net(self, shape, width, text_width):
        persons, in_dim = shape("person_embeddings")
        keypoints = shape("keypoint_embeddings")[0]
        freqs = fourier_freqs(shape("null_xy_feature")[0], 2)
        if (in_dim, keypoints, freqs) != (width, NUM_KEYPOINTS, 8):
            raise ValueError(
                f"official keypoint position_net: embedding width {in_dim}, {keypoints} keypoints, {freqs} Fourier "
                f"frequencies; this project's keypoint modality needs {width}, {NUM_KEYPOINTS} and 8")
        return (KeypointTokenizer(in_dim=width, out_dim=width, max_persons=persons),
                {"modality": self.name, "max_persons": persons})
