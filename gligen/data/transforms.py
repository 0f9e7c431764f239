"""Per-sample transforms: geometry of image, boxes and keypoints, grounding padding. Pure functions, no model code.

Coordinates are normalised to the image they live on. Resizing does not change normalised coordinates, so the whole
resize + crop is one affine map per axis, ``x' = x * scale + shift`` (see ``crop_geometry``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from gligen.constants import COCO_FLIP_PAIRS, MAX_OBJECTS, MAX_PERSONS, NUM_KEYPOINTS, VISIBLE
from gligen.data.schema import DecodedSample

# keypoint index -> index of its mirror image (nose maps to itself)
FLIP_PERMUTATION = np.arange(NUM_KEYPOINTS)
for _left, _right in COCO_FLIP_PAIRS:
    FLIP_PERMUTATION[_left], FLIP_PERMUTATION[_right] = _right, _left


class DataConfigError(ValueError):
    """The data settings cannot apply to this data (not one bad sample): raised through the skip accounting, since
    skipping would drop every sample, or silently ignore a setting."""


@dataclass(frozen=True)
class Crop:
    """A ``size`` x ``size`` window at (left, top) of an image of (width, height) pixels."""

    width: int
    height: int
    left: int
    top: int
    size: int

    def scale_shift(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-axis (x, y) scale and shift taking full-image normalised coords to crop normalised coords."""
        scale = np.array([self.width, self.height], dtype=np.float64) / self.size
        shift = -np.array([self.left, self.top], dtype=np.float64) / self.size
        return scale, shift


def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """Size after resizing so that the short side is exactly ``resolution``."""
    if width <= height:
        return resolution, max(resolution, round(height * resolution / width))
    return max(resolution, round(width * resolution / height)), resolution


def resize_short_side(image: Image.Image, resolution: int) -> Image.Image:
    size = resized_size(*image.size, resolution)
    return image if size == image.size else image.resize(size, Image.BICUBIC)


def choose_crop(width: int, height: int, resolution: int, rng: np.random.Generator | None = None) -> Crop:
    """Centre crop when ``rng`` is None, otherwise a uniformly random window."""
    if rng is None:
        left, top = (width - resolution) // 2, (height - resolution) // 2
    else:
        left, top = int(rng.integers(0, width - resolution + 1)), int(rng.integers(0, height - resolution + 1))
    return Crop(width, height, left, top, resolution)


def crop_boxes(boxes: np.ndarray, crop: Crop) -> np.ndarray:
    """Map boxes [N, 4] (xyxy, normalised to the full image) into the crop; not clipped."""
    scale, shift = crop.scale_shift()
    return boxes * np.tile(scale, 2) + np.tile(shift, 2)


def flip_boxes(boxes: np.ndarray) -> np.ndarray:
    """Horizontal mirror: x0, x1 = 1 - x1, 1 - x0."""
    out = boxes.copy()
    out[:, 0], out[:, 2] = 1.0 - boxes[:, 2], 1.0 - boxes[:, 0]
    return out


def filter_boxes(boxes: np.ndarray, min_area: float = 0.01, max_objects: int = MAX_OBJECTS,
                 drops: Counter | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Drop boxes fully outside [0, 1]^2, clip the rest, drop those with area < ``min_area`` (fraction of the
    image), keep the ``max_objects`` largest (largest first, ties in input order). ``drops`` (optional) counts
    the dropped ones: ``object_outside_crop``, ``object_below_min_area``, ``object_over_cap``.

    Returns the kept boxes and their indices into the input, so per-object data (phrases, embeddings) follows."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    inside = (boxes[:, 2] > 0) & (boxes[:, 0] < 1) & (boxes[:, 3] > 0) & (boxes[:, 1] < 1)
    clipped = np.clip(boxes, 0.0, 1.0)
    area = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    candidates = np.flatnonzero(inside & (area >= min_area))
    order = np.argsort(-area[candidates], kind="stable")[:max_objects]
    kept = candidates[order]
    if drops is not None:
        _count(drops, object_outside_crop=int((~inside).sum()),
               object_below_min_area=int((inside & (area < min_area)).sum()),
               object_over_cap=len(candidates) - len(kept))
    return clipped[kept], kept


def _count(drops: Counter, **counts: int) -> None:
    drops.update({reason: n for reason, n in counts.items() if n})


def crop_keypoints(keypoints: np.ndarray, crop: Crop) -> np.ndarray:
    """Map keypoints [P, 17, 3] (x, y, v) into the crop; those that land outside become invisible (v = 0,
    coordinates zeroed)."""
    out = np.array(keypoints, dtype=np.float64).reshape(-1, NUM_KEYPOINTS, 3)
    scale, shift = crop.scale_shift()
    out[..., :2] = out[..., :2] * scale + shift
    outside = ((out[..., :2] < 0) | (out[..., :2] > 1)).any(-1) | (out[..., 2] == 0)
    out[outside] = 0.0
    return out


def flip_keypoints(keypoints: np.ndarray) -> np.ndarray:
    """Horizontal mirror of keypoints [P, 17, 3]: x -> 1 - x for labelled points, and left/right indices swapped
    (a mirrored left wrist is the right wrist; the official code forgets this swap)."""
    out = np.array(keypoints, dtype=np.float64)[:, FLIP_PERMUTATION]
    labelled = out[..., 2] > 0
    out[..., 0] = np.where(labelled, 1.0 - out[..., 0], out[..., 0])
    return out


def pad_grounding(boxes: np.ndarray, phrases: list[str], max_objects: int = MAX_OBJECTS) -> dict:
    """Pad to ``max_objects``: ``boxes`` float32 [max_objects, 4] (zeros where padded), ``masks`` float32
    [max_objects] (1 = real object), ``phrases`` (max_objects strings, "" where padded)."""
    n = len(phrases)
    if n > max_objects or len(boxes) != n:
        raise ValueError(f"{len(boxes)} boxes and {n} phrases for max_objects={max_objects}")
    out_boxes = torch.zeros(max_objects, 4)
    out_boxes[:n] = torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(n, 4))
    masks = torch.zeros(max_objects)
    masks[:n] = 1.0
    return {"boxes": out_boxes, "masks": masks, "phrases": list(phrases) + [""] * (max_objects - n)}


def pad_rows(rows: np.ndarray, max_rows: int) -> torch.Tensor:
    """Zero-pad per-object rows [n, D] to [max_rows, D]."""
    out = torch.zeros(max_rows, rows.shape[1])
    out[: len(rows)] = torch.as_tensor(rows, dtype=torch.float32)
    return out


def pad_keypoints(keypoints: np.ndarray, max_persons: int = MAX_PERSONS, drops: Counter | None = None,
                  areas: np.ndarray | None = None) -> dict:
    """Keep ``max_persons`` persons and pad: those with most present keypoints, or with ``areas`` [P] the largest
    (the official slots); ties in input order. ``keypoints`` float32 [max_persons, 17, 2], ``keypoint_masks``
    float32 [max_persons, 17] (1 where visibility is 2). ``drops`` (optional) counts persons with present
    keypoints left out by the cap (``person_over_cap``)."""
    keypoints = np.asarray(keypoints, dtype=np.float64).reshape(-1, NUM_KEYPOINTS, 3)
    present = keypoints[..., 2] == VISIBLE
    rank = present.sum(1) if areas is None else np.asarray(areas, dtype=np.float64)
    order = np.argsort(-rank, kind="stable")[:max_persons]
    if drops is not None:
        _count(drops, person_over_cap=int(present.any(1).sum() - present[order].any(1).sum()))
    xy = torch.zeros(max_persons, NUM_KEYPOINTS, 2)
    masks = torch.zeros(max_persons, NUM_KEYPOINTS)
    n = len(order)
    xy[:n] = torch.as_tensor(keypoints[order, :, :2] * present[order, :, None], dtype=torch.float32)
    masks[:n] = torch.as_tensor(present[order], dtype=torch.float32)
    return {"keypoints": xy, "keypoint_masks": masks}


def person_areas(persons, cropped: np.ndarray, crop: Crop) -> np.ndarray:
    """Area of each person in the crop: its box mapped and clipped, or, for a person stored without a box, the
    bounding box of its labelled keypoints there (0 when none is left)."""
    areas = np.zeros(len(persons))
    for i, person in enumerate(persons):
        if person.box is not None:
            x0, y0, x1, y1 = np.clip(crop_boxes(np.asarray(person.box, dtype=np.float64)[None], crop)[0], 0, 1)
        else:
            labelled = cropped[i][cropped[i, :, 2] > 0, :2]
            if not len(labelled):
                continue
            (x0, y0), (x1, y1) = labelled.min(0), labelled.max(0)
        areas[i] = (x1 - x0) * (y1 - y0)
    return areas


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W] in [-1, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def entity_to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """Entity (reference) image -> float32 [3, size, size] in [-1, 1]: short side resized to ``size`` (bicubic),
    centre crop, like CLIP's own preprocessing (so with ``size`` = CLIP's image_size nothing is resampled twice)."""
    image = resize_short_side(image.convert("RGB"), size)
    crop = choose_crop(*image.size, size)
    return image_to_tensor(image.crop((crop.left, crop.top, crop.left + size, crop.top + size)))


def pad_entity_images(sample: DecodedSample, kept: np.ndarray, size: int, max_objects: int = MAX_OBJECTS
                      ) -> dict | None:
    """Entity images of the kept objects, in their (kept, reordered) order: ``entity_pixel_values`` float32
    [max_objects, 3, size, size] in [-1, 1] (zeros where an object has no entity image or is padding) and
    ``entity_masks`` float32 [max_objects] (1 = the row holds an image). None when no kept object has one.

    Entity images describe the reference object, not the scene: they are never cropped with the scene nor flipped
    with it (the precomputed ``entity_embeds`` have no ``_flip`` variant either)."""
    members = [sample.annotation.objects[i].entity_image for i in kept]
    if not any(m is not None for m in members):
        return None
    pixels = torch.zeros(max_objects, 3, size, size)
    masks = torch.zeros(max_objects)
    converted: dict[str, torch.Tensor] = {}  # objects may share an entity image
    for row, member in enumerate(members):
        if member is None:
            continue
        if member not in converted:
            converted[member] = entity_to_tensor(sample.entity_images[member], size)
        pixels[row], masks[row] = converted[member], 1.0
    return {"entity_pixel_values": pixels, "entity_masks": masks}


@dataclass(frozen=True)
class TransformConfig:
    resolution: int
    max_objects: int = MAX_OBJECTS
    max_persons: int = MAX_PERSONS
    min_area: float = 0.01
    random_crop: bool = False
    random_flip: bool = True
    entity_images: bool = False  # carry entity images as entity_pixel_values (image / text_image modalities)
    entity_resolution: int | None = None  # side of entity_pixel_values; None = resolution
    # where paper and official code differ (gligen/presets.py: their values); GroundingDataModule resolves these
    detection_captions: str = "null"  # or "category_names": detection samples get "cat, dog" as their caption
    keypoint_slots: str = "most_visible"  # or "largest": the person slots go to the largest persons
    keypoint_captions: str = "optional"  # or "required": keypoint data without captions is an error


def transform_sample(sample: DecodedSample, cfg: TransformConfig, rng: np.random.Generator | None = None,
                     drops: Counter | None = None) -> dict:
    """Decoded sample -> one training example (the per-sample part of the batch contract).

    ``rng`` None means deterministic (validation): centre crop, no flip. With latents the geometry is fixed at
    encoding time: the boxes refer to the encoded image and only the flip remains (it needs the ``_flip`` latents).
    ``drops`` (optional) counts the objects and persons left out, by reason (``filter_boxes``, ``pad_keypoints``;
    ``person_outside_crop``: a person whose visible keypoints all fell outside the crop).
    """
    ann = sample.annotation
    flip_coin = rng is not None and cfg.random_flip and bool(rng.random() < 0.5)
    out: dict = {"key": sample.key, "kind": ann.kind}

    if "latent_mean.npy" in sample.arrays:
        if rng is not None and cfg.random_flip and "latent_mean_flip.npy" not in sample.arrays:
            raise DataConfigError(
                f"{sample.url} key {sample.key}: random_flip is on but these precomputed latents have no "
                "latent_mean_flip.npy / latent_std_flip.npy, so no sample would ever be flipped: precompute with "
                "--flip, or set data.random_flip: false")
        flip = flip_coin
        suffix = "_flip" if flip else ""
        for name in ("latent_mean", "latent_std"):
            out[name] = torch.as_tensor(sample.arrays[f"{name}{suffix}.npy"], dtype=torch.float32)
        crop = Crop(1, 1, 0, 0, 1)  # identity
    else:
        image = resize_short_side(sample.image, cfg.resolution)
        crop = choose_crop(*image.size, cfg.resolution, rng if cfg.random_crop else None)
        image = image.crop((crop.left, crop.top, crop.left + crop.size, crop.top + crop.size))
        flip = flip_coin
        if flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        out["pixel_values"] = image_to_tensor(image)

    boxes = crop_boxes(np.array([o.box for o in ann.objects], dtype=np.float64).reshape(-1, 4), crop)
    boxes, kept = filter_boxes(flip_boxes(boxes) if flip else boxes, cfg.min_area, cfg.max_objects, drops)
    out.update(pad_grounding(boxes, [ann.objects[i].phrase for i in kept], cfg.max_objects))
    # class names travel along for evaluation (detectors report classes, not free phrases); "" where unknown
    out["categories"] = [ann.objects[i].category or "" for i in kept] + [""] * (cfg.max_objects - len(kept))
    for name in ("phrase_embeds", "entity_embeds"):
        if f"{name}.npy" in sample.arrays:
            out[name] = pad_rows(sample.arrays[f"{name}.npy"][kept], cfg.max_objects)
    if cfg.entity_images and "entity_embeds.npy" not in sample.arrays:  # precomputed entity features win
        entities = pad_entity_images(sample, kept, cfg.entity_resolution or cfg.resolution, cfg.max_objects)
        if entities is not None:
            out.update(entities)

    # detection data trains with the null caption: "" here, and GLIGENModule nulls the caption embeddings of
    # kind "detection" itself, so stored embeddings are kept (a mixed batch keeps its precomputed path); with
    # category_names (official) it gets its kept objects' names, largest first, which the module encodes
    out["caption"] = "" if ann.kind == "detection" else sample.caption
    if ann.kind == "detection" and cfg.detection_captions == "category_names" and len(kept):
        out["caption"] = ", ".join(ann.objects[i].category or ann.objects[i].phrase for i in kept)
        out["category_caption"] = True
    if "caption_embeds.npy" in sample.arrays:
        out["caption_embeds"] = torch.as_tensor(sample.arrays["caption_embeds.npy"], dtype=torch.float32)

    if ann.persons is not None:
        if cfg.keypoint_captions == "required" and not sample.caption.strip():
            message = (f"{sample.url} key {sample.key}: keypoint_captions is 'required' (the official keypoint data "
                       "always trains with a real caption) but this sample has none")
            if ann.kind == "detection":  # converted without captions: every sample is alike
                raise DataConfigError(message + ": convert the keypoints with --captions, or set "
                                      "data.init_args.keypoint_captions: optional")
            raise ValueError(message)  # one sample: a counted skip
        kps = np.stack([p.keypoints for p in ann.persons]) if ann.persons else np.zeros((0, NUM_KEYPOINTS, 3))
        cropped = crop_keypoints(kps, crop)
        if drops is not None:
            visible = (kps[..., 2] == VISIBLE).any(1)
            _count(drops, person_outside_crop=int((visible & ~(cropped[..., 2] == VISIBLE).any(1)).sum()))
        areas = person_areas(ann.persons, cropped, crop) if cfg.keypoint_slots == "largest" else None
        out.update(pad_keypoints(flip_keypoints(cropped) if flip else cropped, cfg.max_persons, drops, areas))
    return out


def transform_or_skip(sample: DecodedSample, cfg: TransformConfig, rng: np.random.Generator | None,
                      skips) -> dict | None:
    """``transform_sample`` inside the skip accounting: any exception becomes a counted ``transform_error``
    naming shard and key (raised in strict mode); drops are counted in ``skips.dropped``. ``skips``: a
    ``gligen.data.decode.SkipCounter``."""
    drops: Counter = Counter()
    try:
        example = transform_sample(sample, cfg, rng, drops)
    except DataConfigError:  # a setting that cannot apply to the data: every sample would fail the same way
        raise
    except Exception as exn:  # one sample's failure, whatever its kind, must not end the run
        skips.record("transform_error", sample.url, sample.key, f"{type(exn).__name__}: {exn}")
        return None
    skips.dropped.update(drops)
    return example
