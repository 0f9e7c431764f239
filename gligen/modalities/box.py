"""Box grounding (the paper's main setting): each object is a box and a phrase; tokens = MLP([phrase, Fourier(box)])."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from gligen.constants import MAX_OBJECTS, MAX_PERSONS
from gligen.metrics.detectors import make_detector
from gligen.metrics.grounding import box_grounding_metrics
from gligen.modalities.base import Modality, fourier_freqs
from gligen.nn.tokenizers import TextBoxTokenizer, check_box_grounding


def layout_boxes(layouts: list[dict], max_objects: int = MAX_OBJECTS
                 ) -> tuple[torch.Tensor, torch.Tensor, list[list[str]]]:
    """Layouts' objects -> boxes [B, N, 4], masks [B, N], phrases (B lists of N, "" padded); an object without a
    phrase (an image-only entity) gets "". Objects past `max_objects` are cut (read_layout refuses them first)."""
    boxes = torch.zeros(len(layouts), max_objects, 4)
    masks = torch.zeros(len(layouts), max_objects)
    phrases = [[""] * max_objects for _ in layouts]
    for i, layout in enumerate(layouts):
        for j, obj in enumerate(layout.get("objects", [])[:max_objects]):
            boxes[i, j] = torch.tensor([float(v) for v in obj["box"]])
            masks[i, j] = 1
            phrases[i][j] = str(obj.get("phrase") or "")
    return boxes, masks, phrases


def phrase_features(ldm, batch: Mapping) -> torch.Tensor:
    """Pooled CLIP features [B, N, D] of the batch's phrases (precomputed `phrase_embeds` when it has them)."""
    if "phrase_embeds" in batch:
        return batch["phrase_embeds"].float()
    return ldm.encode_phrases(batch["phrases"])


def box_detector(config: Mapping):
    """`detector` of an experiment config: "toy" (default) = the toy read-back, else a transformers detector."""
    return make_detector(config.get("detector") or "toy")


class BoxModality(Modality):
    name = "box"
    primary_metric = "ap50"
    placement_metric = "coarse_ap50"  # colour alone on the toy: where, whatever shape the base draws
    metric_names = ("ap", "ap50", "ap75", "miou", "coarse_ap50", "coarse_miou")
    diffusers_pipeline = "StableDiffusionGLIGENPipeline"
    diffusers_attention_type = "gated"
    official_tokenizer = "text_grounding_net"
    official_marker = "position_net.null_positive_feature"

    def position_net(self, token_dim, text_dim, max_persons=MAX_PERSONS, position_encoding="fourier"):
        # None: add_grounding builds its default TextBoxTokenizer after the fusers, so box models initialise
        # exactly as before modalities existed
        if position_encoding == "fourier":
            return None
        return TextBoxTokenizer(positive_len=token_dim, out_dim=token_dim, position_encoding=position_encoding)

    def check_batch(self, batch, max_objects=MAX_OBJECTS, max_persons=MAX_PERSONS, *, user_layout=False):
        check_box_grounding(batch["boxes"].float(), batch["masks"].float(), batch.get("phrases"), batch.get("keys"),
                            max_objects)

    def batch_inputs(self, ldm, batch, *, training=False, generator=None, check=True, max_objects=MAX_OBJECTS,
                     max_persons=MAX_PERSONS):
        if check:
            self.check_batch(batch, max_objects)
        return {"boxes": batch["boxes"].float(), "masks": batch["masks"].float(),
                "positive_embeddings": phrase_features(ldm, batch)}

    def layouts_batch(self, layouts, max_objects=MAX_OBJECTS, max_persons=MAX_PERSONS, ldm=None):
        boxes, masks, phrases = layout_boxes(layouts, max_objects)
        return {"boxes": boxes, "masks": masks, "phrases": phrases}

    def detector(self, config):
        return box_detector(config)

    def metrics(self, images, layouts, detector=None, records=None):
        return box_grounding_metrics(images, layouts, detector or make_detector("toy"), records)

    def diffusers_problems(self, position_net, width):
        if not isinstance(position_net, TextBoxTokenizer):
            return [f"position_net is {type(position_net).__name__}, diffusers needs the text+box tokenizer"]
        if position_net.position_encoding != "fourier":
            return [f"position_net encodes boxes as {position_net.position_encoding!r}; diffusers has Fourier only"]
        if (position_net.fourier_freqs, position_net.positive_len) != (8, width):
            return [f"position_net has {position_net.fourier_freqs} Fourier frequencies and phrase width "
                    f"{position_net.positive_len}; diffusers fixes 8 and the cross-attention width {width}"]
        return []

    def official_position_net(self, shape, width, text_width):
        (positive_len,) = shape("null_positive_feature")
        freqs = fourier_freqs(shape("null_position_feature")[0], 4)
        if (positive_len, freqs) != (width, 8):
            raise ValueError(
                f"official box position_net: phrase width {positive_len}, {freqs} Fourier frequencies; "
                f"this project's box modality needs the cross-attention width {width} and 8")
        return TextBoxTokenizer(positive_len=width, out_dim=width), {"modality": self.name}
