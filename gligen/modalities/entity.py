"""Image-entity grounding: each box carries a reference image (and, for text_image, optionally a phrase).

"text_image": an object has a phrase, an image or both; in training, boxes with both randomly lose one
(`text_or_image_drop`). "image": every text feature masked (the same tokenizer, text_image with phrases off).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from gligen.constants import MAX_OBJECTS, MAX_PERSONS
from gligen.data.decode import PIL_FORMATS
from gligen.metrics.detectors import make_detector
from gligen.metrics.grounding import entity_grounding_metrics
from gligen.modalities.base import Modality, fourier_freqs
from gligen.modalities.box import box_detector, layout_boxes, phrase_features
from gligen.nn.tokenizers import GroundingInputError, TextImageBoxTokenizer, check_box_grounding, text_or_image_drop


def has_entity(obj: dict) -> bool:
    return any(obj.get(k) is not None for k in ("entity_embed", "entity_pixels", "entity_image"))


def entity_pil(image) -> Image.Image:
    """A layout's `entity_image` (path, PIL image or uint8 HxWx3 array) as an RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        # JPEG / PNG / WebP only, as in the shards: PIL would otherwise open any format it knows (EPS runs
        # Ghostscript where installed)
        try:
            with Image.open(image, formats=list(PIL_FORMATS.values())) as opened:
                return opened.convert("RGB")
        except Image.UnidentifiedImageError:
            raise ValueError(f"entity_image {image!r}: not a JPEG, PNG or WebP image") from None
    array = image.detach().cpu().numpy() if torch.is_tensor(image) else np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"entity_image arrays must be uint8 HxWx3, got {array.dtype} {array.shape}")
    return Image.fromarray(array[..., :3])


def layout_entities(ldm, layouts: list[dict], max_objects: int = MAX_OBJECTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-entity features [B, N, D] (ldm.encode_entity_images, in text-feature space) and has-image [B, N].

    Per object: `entity_embed` (precomputed, used as is), `entity_pixels` (float [3, H, W] in [-1, 1]) or
    `entity_image` (path / PIL / uint8 array), images encoded in one batch per kind; objects with none of them get a
    zero row and has-image 0."""
    width = ldm.text_encoder.config.hidden_size
    embeds = torch.zeros(len(layouts), max_objects, width)
    has_image = torch.zeros(len(layouts), max_objects)
    pending, slots = [], []
    tensors, tensor_slots = [], []
    for i, layout in enumerate(layouts):
        for j, obj in enumerate(layout.get("objects", [])[:max_objects]):
            if obj.get("entity_embed") is not None:
                row = torch.as_tensor(np.asarray(obj["entity_embed"], dtype=np.float32)).flatten()
                if row.numel() != width:
                    raise ValueError(f"layout {i} object {j}: entity_embed has {row.numel()} values, expected {width}")
                embeds[i, j], has_image[i, j] = row, 1
            elif obj.get("entity_pixels") is not None:
                tensors.append(torch.as_tensor(obj["entity_pixels"]).float().cpu())
                tensor_slots.append((i, j))
            elif obj.get("entity_image") is not None:
                pending.append(entity_pil(obj["entity_image"]))
                slots.append((i, j))
    for images, where in ((pending, slots), (torch.stack(tensors) if tensors else [], tensor_slots)):
        if len(where):
            features = ldm.encode_entity_images(images).float().cpu()
            for (i, j), feature in zip(where, features):
                embeds[i, j], has_image[i, j] = feature, 1
    return embeds, has_image


def entity_features(ldm, batch, masks: torch.Tensor) -> torch.Tensor:
    """Image-entity features [B, N, D]: the precomputed `entity_embeds` when the batch has them, else
    `encode_entity_images` (frozen CLIP, no grad) of `entity_pixel_values` [B, N, 3, S, S], only for the rows where
    `entity_masks` (and the box mask) is set; zero rows elsewhere."""
    if "entity_embeds" in batch:
        return batch["entity_embeds"].float()
    if "entity_pixel_values" not in batch:
        raise GroundingInputError(
            "image-entity grounding needs `entity_embeds` or `entity_pixel_values` in the batch "
            "(GroundingDataModule(entity_images=True), or precomputed entity_embeds)")
    pixels = batch["entity_pixel_values"]
    rows = (batch["entity_masks"].to(masks.device) > 0) & (masks > 0)
    out = torch.zeros(*masks.shape, ldm.text_encoder.config.hidden_size, device=masks.device)
    if rows.any():
        out[rows] = ldm.encode_entity_images(pixels[rows]).to(out.device, out.dtype)
    return out


class EntityModality(Modality):
    family = "objects"
    entity_images = True
    primary_metric = "entity_ap50"  # the class of each box's REFERENCE image must appear in it
    placement_metric = "entity_coarse_ap50"
    metric_names = ("entity_ap", "entity_ap50", "entity_ap75", "entity_miou", "entity_coarse_ap50",
                    "entity_coarse_miou")
    diffusers_pipeline = "StableDiffusionGLIGENTextImagePipeline"
    diffusers_attention_type = "gated-text-image"

    def __init__(self, name: str, text: bool):
        self.name, self.text = name, text
        # only text_image is an official variant (image = the same weights with phrases masked)
        self.official_tokenizer = "text_image_grounding_net" if text else None
        self.official_marker = "position_net.null_text_feature" if text else None

    def position_net(self, token_dim, text_dim, max_persons=MAX_PERSONS, position_encoding="fourier"):
        return TextImageBoxTokenizer(in_dim=text_dim, out_dim=token_dim, position_encoding=position_encoding)

    def check_batch(self, batch, max_objects=MAX_OBJECTS, max_persons=MAX_PERSONS, *, user_layout=False):
        masks = batch["masks"].float()
        # training data: text_image boxes all have phrases; a user's layout may give an image instead
        phrases = batch.get("phrases") if self.text and not user_layout else None
        check_box_grounding(batch["boxes"].float(), masks, phrases, batch.get("keys"), max_objects)
        if not user_layout:
            return
        has_image = batch["entity_masks"].float() * masks
        has_text = masks * batch["phrase_masks"] if self.text else torch.zeros_like(masks)
        missing = (masks > 0) & (has_image + has_text == 0)
        if missing.any():
            i, j = (int(v) for v in missing.nonzero()[0])
            name = batch["keys"][i] if batch.get("keys") else f"layout {i}"
            need = "neither a phrase nor an entity_image" if self.text else "no entity_image (modality image)"
            raise GroundingInputError(f"{name}: object {j} has {need}")

    def batch_inputs(self, ldm, batch, *, training=False, generator=None, check=True, max_objects=MAX_OBJECTS,
                     max_persons=MAX_PERSONS):
        if check:
            self.check_batch(batch, max_objects)
        boxes, masks = batch["boxes"].float(), batch["masks"].float()
        images = entity_features(ldm, batch, masks)
        in_dim = getattr(getattr(ldm.unet, "position_net", None), "in_dim", ldm.text_encoder.config.hidden_size)
        if tuple(images.shape) != (*masks.shape, in_dim):
            raise GroundingInputError(f"entity_embeds shape {tuple(images.shape)}, expected "
                                      f"{(*masks.shape, in_dim)} (boxes x text width)")
        has_image = batch.get("entity_masks", images.abs().sum(-1) > 0)
        image_masks = masks * has_image.to(masks.dtype)
        if self.text:
            texts = phrase_features(ldm, batch)
            # layouts say which boxes have a phrase; in training data every box has one (check_batch)
            phrases_masks = masks * batch["phrase_masks"].to(masks) if "phrase_masks" in batch else masks
            if training:  # only boxes with both features can lose one; text-only boxes keep their text
                both = image_masks * phrases_masks
                kept_text, dropped_images = text_or_image_drop(both, generator)
                image_masks = torch.where(both.bool(), dropped_images, image_masks)
                phrases_masks = torch.where(both.bool(), kept_text, phrases_masks)
        else:
            texts, phrases_masks = torch.zeros_like(images), torch.zeros_like(masks)
        return {"boxes": boxes, "masks": masks, "phrases_masks": phrases_masks, "image_masks": image_masks,
                "phrases_embeddings": texts, "image_embeddings": images}

    def layouts_batch(self, layouts, max_objects=MAX_OBJECTS, max_persons=MAX_PERSONS, ldm=None):
        boxes, masks, phrases = layout_boxes(layouts, max_objects)
        phrase_masks = torch.tensor([[1.0 if p else 0.0 for p in row] for row in phrases])
        batch = {"boxes": boxes, "masks": masks, "phrases": phrases, "phrase_masks": phrase_masks}
        if ldm is None:
            batch["entity_masks"] = torch.tensor(
                [[float(has_entity(o)) for o in layout.get("objects", [])[:max_objects]]
                 + [0.0] * (max_objects - len(layout.get("objects", [])[:max_objects])) for layout in layouts])
        else:
            batch["entity_embeds"], batch["entity_masks"] = layout_entities(ldm, layouts, max_objects)
        return batch

    def check_layouts(self, layouts, source):
        if not any(has_entity(o) for layout in layouts for o in layout.get("objects", [])):
            raise ValueError(f"{source}: no entity images in these validation layouts; the {self.name} checkpoint "
                             "needs objects with entity images")

    def detector(self, config):
        return box_detector(config)

    def metrics(self, images, layouts, detector=None, records=None):
        return entity_grounding_metrics(images, layouts, detector or make_detector("toy"), records)

    def diffusers_problems(self, position_net, width):
        if not isinstance(position_net, TextImageBoxTokenizer):
            return [f"position_net is {type(position_net).__name__}, diffusers needs text+image+box"]
        if position_net.position_encoding != "fourier":
            return [f"position_net encodes boxes as {position_net.position_encoding!r}; diffusers has Fourier only"]
        if (position_net.fourier_freqs, position_net.in_dim) != (8, width):
            return [f"position_net has {position_net.fourier_freqs} Fourier frequencies and entity width "
                    f"{position_net.in_dim}; diffusers fixes 8 and the cross-attention width {width}"]
        return []

    def official_position_net(self, shape, width, text_width):
        if not self.text:
            return super().official_position_net(shape, width, text_width)
        (in_dim,) = shape("null_text_feature")
        freqs = fourier_freqs(shape("null_position_feature")[0], 4)
        if (in_dim, freqs) != (text_width, 8):
            raise ValueError(
                f"official text_image position_net: entity width {in_dim}, {freqs} Fourier frequencies; this "
                f"project's text_image modality needs the text encoder width {text_width} and 8")
        return TextImageBoxTokenizer(in_dim=text_width, out_dim=width), {"modality": self.name}

