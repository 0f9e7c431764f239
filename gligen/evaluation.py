"""Evaluation: layouts -> grounded samples -> grounding accuracy (detector AP vs the input layout) and quality.

Layouts (the data schema's annotation, plus evaluation-only fields) drive every modality:
    {"caption": str,
     "objects": [{"box": [x0, y0, x1, y1], "phrase": str, "category": str | None,
                  "entity_image": path | PIL image | uint8 HxWx3 array (optional),
                  "entity_pixels": float [3, H, W] in [-1, 1] (optional, as the data pipeline's entity crops),
                  "entity_embed": [D] precomputed image-entity feature (optional, wins over the images),
                  "entity_category": str (optional: the reference image's class when it is not `category`)}],
     "persons": [{"keypoints": [[x, y, v] x 17]}]   (normalised; only v = 2 counts as present)}
`grounding_inputs(ldm, layouts, modality=...)` turns them into the position net's keyword arguments for the
modality (box | keypoint | image | text_image; default: inferred from the UNet's position net) and
`modality_metrics` scores generated images with that modality's own metric.

The paper's protocol, made pluggable: generate one image per validation layout (its caption and boxes), run a
detector on the generated images and score COCO AP / AP50 / AP75 of its detections against the input layout (the
"YOLO score"), plus mIoU; FID / KID against the real validation images. On the toy world the detector is the exact
rule-based one; on real data it is a detector the user names (see gligen.metrics.grounding).
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from .data.collate import collate_batch
from .data.datamodule import InMemoryShardDataset
from .data.shards import SkipCounter, resolve_shards
from .data.transforms import TransformConfig
from .ldm import FrozenLDM
from .nn.tokenizers import MAX_OBJECTS, MAX_PERSONS, NUM_KEYPOINTS
from .sampling import sample

MODALITIES = ("box", "keypoint", "image", "text_image")  # as gligen.module.MODALITIES

SEED_STRIDE = 1_000_003  # image i of seed s uses generator seed s * SEED_STRIDE + i: independent of batching


def layouts_from_batch(batch: dict) -> list[dict]:
    """A collated batch -> one layout per sample in the schema's form: caption + objects (box, phrase, category),
    plus each object's `entity_embed` where the batch has a non-zero `entity_embeds` row (or `entity_masks` says
    so), or its `entity_pixels` ([3, S, S] in [-1, 1]) where it has `entity_pixel_values`, and `persons` (v = 2
    for present joints) where it has keypoints."""
    layouts = []
    for i, caption in enumerate(batch["captions"]):
        objects = []
        for j in batch["masks"][i].nonzero().flatten().tolist():
            category = batch["categories"][i][j] if "categories" in batch else ""
            obj = {"box": batch["boxes"][i, j].tolist(), "phrase": batch["phrases"][i][j], "category": category or None}
            if "entity_embeds" in batch:
                row = batch["entity_embeds"][i, j]
                has_image = bool(batch["entity_masks"][i, j]) if "entity_masks" in batch else bool(row.abs().sum() > 0)
                if has_image:
                    obj["entity_embed"] = row.float().cpu()
            elif "entity_pixel_values" in batch and bool(batch["entity_masks"][i, j]):
                obj["entity_pixels"] = batch["entity_pixel_values"][i, j]
            objects.append(obj)
        layout = {"key": batch["keys"][i], "caption": caption, "objects": objects}
        if "keypoints" in batch and "keypoint_masks" in batch:
            layout["persons"] = persons_from_tensors(batch["keypoints"][i], batch["keypoint_masks"][i])
        layouts.append(layout)
    return layouts


def persons_from_tensors(points: torch.Tensor, masks: torch.Tensor) -> list[dict]:
    """Padded keypoints [P, 17, 2] (or [P*17, 2]) and masks -> the schema's persons (empty slots dropped)."""
    points = points.detach().float().cpu().reshape(-1, NUM_KEYPOINTS, 2)
    masks = masks.detach().float().cpu().reshape(-1, NUM_KEYPOINTS)
    return [{"keypoints": [[float(x), float(y), 2 if m > 0 else 0] for (x, y), m in zip(p.tolist(), pm.tolist())]}
            for p, pm in zip(points, masks) if pm.any()]


def load_layouts(spec: str, resolution: int, limit: int | None = None, max_objects: int = MAX_OBJECTS,
                 entity_images: bool = False, entity_resolution: int | None = None
                 ) -> tuple[list[dict], list[np.ndarray]]:
    """Validation layouts and their real images (uint8 HxWx3), deterministic (centre crop, no flip). Persons come
    along where the shards have them (keypoint); `entity_images`: each object's entity image as `entity_pixels`
    (side `entity_resolution`, default `resolution`), as the image / text_image data pipeline feeds them (shards
    with precomputed entity_embeds give `entity_embed` either way)."""
    cfg = TransformConfig(resolution, max_objects, random_flip=False, entity_images=entity_images,
                          entity_resolution=entity_resolution)
    dataset = InMemoryShardDataset(resolve_shards(spec), cfg, SkipCounter())
    count = len(dataset) if limit is None else min(limit, len(dataset))
    if count == 0:
        raise ValueError(f"{spec}: no validation samples")
    examples = [dataset[i] for i in range(count)]
    batch = collate_batch(examples)
    if "pixel_values" not in batch:
        raise ValueError(f"{spec}: evaluation needs the real images (these shards carry latents only)")
    return layouts_from_batch(batch), from_pixels(batch["pixel_values"])


def layout_tensors(layouts: list[dict], max_objects: int = MAX_OBJECTS):
    """Layouts (schema objects: box + phrase) -> boxes [B, N, 4], masks [B, N], phrases (B lists of N, "" padded).

    An object without a phrase (image-only entities) gets "" (box grounding rejects that: check_box_grounding)."""
    boxes = torch.zeros(len(layouts), max_objects, 4)
    masks = torch.zeros(len(layouts), max_objects)
    phrases = [[""] * max_objects for _ in layouts]
    for i, layout in enumerate(layouts):
        for j, obj in enumerate(layout.get("objects", [])[:max_objects]):
            boxes[i, j] = torch.tensor([float(v) for v in obj["box"]])
            masks[i, j] = 1
            phrases[i][j] = str(obj.get("phrase") or "")
    return boxes, masks, phrases


def keypoint_tensors(layouts: list[dict], max_persons: int = MAX_PERSONS) -> tuple[torch.Tensor, torch.Tensor]:
    """Layouts' persons -> points [B, max_persons, 17, 2] and masks [B, max_persons, 17] (1 where v = 2), as the
    data pipeline pads them (gligen.data.transforms.pad_keypoints: the persons with most present joints first)."""
    from .data.transforms import pad_keypoints

    points = torch.zeros(len(layouts), max_persons, NUM_KEYPOINTS, 2)
    masks = torch.zeros(len(layouts), max_persons, NUM_KEYPOINTS)
    for i, layout in enumerate(layouts):
        persons = layout.get("persons") or []
        kps = np.array([p["keypoints"] for p in persons], dtype=np.float64).reshape(-1, NUM_KEYPOINTS, 3)
        padded = pad_keypoints(kps, max_persons)
        points[i], masks[i] = padded["keypoints"], padded["keypoint_masks"]
    return points, masks


def has_entity(obj: dict) -> bool:
    return any(obj.get(k) is not None for k in ("entity_embed", "entity_pixels", "entity_image"))


def _entity_pil(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        from .data.shards import PIL_FORMATS

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


def entity_tensors(ldm: FrozenLDM, layouts: list[dict], max_objects: int = MAX_OBJECTS
                   ) -> tuple[torch.Tensor, torch.Tensor]:
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
                pending.append(_entity_pil(obj["entity_image"]))
                slots.append((i, j))
    for images, where in ((pending, slots), (torch.stack(tensors) if tensors else [], tensor_slots)):
        if len(where):
            features = ldm.encode_entity_images(images).float().cpu()
            for (i, j), feature in zip(where, features):
                embeds[i, j], has_image[i, j] = feature, 1
    return embeds, has_image


def infer_modality(ldm: FrozenLDM) -> str:
    """The modality the UNet's position net serves: `ldm.grounding_modality` when set, else from its type
    (a TextImageBoxTokenizer reads as text_image: pass modality="image" for image-only models)."""
    from .nn.tokenizers import KeypointTokenizer, TextImageBoxTokenizer

    explicit = getattr(ldm, "grounding_modality", None)
    if explicit:
        return explicit
    net = getattr(ldm.unet, "position_net", None)
    if isinstance(net, KeypointTokenizer):
        return "keypoint"
    if isinstance(net, TextImageBoxTokenizer):
        return "text_image"
    return "box"


def grounding_inputs(ldm: FrozenLDM, layouts: list[dict], max_objects: int = MAX_OBJECTS,
                     modality: str | None = None, max_persons: int | None = None) -> dict:
    """The position net's keyword arguments (`cross_attention_kwargs["gligen"]`) for a list of layouts.

    modality (default: `infer_modality`):
      box:        {"boxes", "masks", "positive_embeddings"}
      keypoint:   {"points" [B, P, 17, 2], "masks" [B, P, 17]} (P = max_persons, default the position net's)
      image:      {"boxes", "masks", "phrases_masks" (all 0), "image_masks", "phrases_embeddings" (0),
                   "image_embeddings"}
      text_image: the same with phrases_masks = 1 for objects with a phrase (an object may have text, image or both)
    """
    modality = modality or infer_modality(ldm)
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    device = ldm.unet.device
    if modality == "keypoint":
        if max_persons is None:
            max_persons = getattr(getattr(ldm.unet, "position_net", None), "max_persons", MAX_PERSONS)
        points, masks = keypoint_tensors(layouts, max_persons)
        return {"points": points.to(device), "masks": masks.to(device)}
    boxes, masks, phrases = layout_tensors(layouts, max_objects)
    if modality == "box":
        return {"boxes": boxes.to(device), "masks": masks.to(device),
                "positive_embeddings": ldm.encode_phrases(phrases)}
    images, has_image = entity_tensors(ldm, layouts, max_objects)
    image_masks = masks * has_image
    if modality == "text_image":
        phrases_masks = masks * torch.tensor([[1.0 if p else 0.0 for p in row] for row in phrases])
        texts = ldm.encode_phrases(phrases).float()
    else:
        phrases_masks, texts = torch.zeros_like(masks), torch.zeros_like(images)
    dtype = ldm.unet.dtype
    return {"boxes": boxes.to(device), "masks": masks.to(device), "phrases_masks": phrases_masks.to(device),
            "image_masks": image_masks.to(device), "phrases_embeddings": texts.to(device, dtype),
            "image_embeddings": images.to(device, dtype)}


def generate(ldm: FrozenLDM, layouts: list[dict], betas: list[float], seed: int = 0, sampler: str = "ddim",
             steps: int = 50, guidance: float = 7.5, batch_size: int = 50, progress: bool = True,
             max_objects: int = MAX_OBJECTS, modality: str | None = None,
             init_images: list[np.ndarray] | None = None, strength: float = 1.0,
             interrupt=None) -> list[np.ndarray]:
    """One uint8 HxWx3 image per layout; image i depends only on (seed, i, layout i), not on the batching.
    modality: which grounding inputs the layouts become (default: `infer_modality`).
    init_images, strength: SDEdit from these uint8 images (see `sample`), encoded per batch.
    interrupt: see `sample` (raises `SamplingInterrupted`)."""
    images = []
    starts = range(0, len(layouts), batch_size)
    for start in tqdm(starts, desc=f"sampling seed {seed}", disable=not progress, leave=False):
        chunk = layouts[start:start + batch_size]
        init = None
        if init_images is not None:
            init = ldm.encode_images(to_pixels(init_images[start:start + batch_size]).to(ldm.vae.device),
                                     torch.Generator().manual_seed(seed + start))
        pixels = sample(
            ldm, [layout["caption"] for layout in chunk], grounding_inputs(ldm, chunk, max_objects, modality), betas,
            sampler=sampler, steps=steps, guidance=guidance,
            seeds=[seed * SEED_STRIDE + start + k for k in range(len(chunk))], init_latents=init, strength=strength,
            interrupt=interrupt,
        )
        images.extend((pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return images


def reconstruct(ldm: FrozenLDM, images: list[np.ndarray], seed: int = 0, batch_size: int = 256) -> list[np.ndarray]:
    """uint8 HxWx3 images through the LDM's VAE (encode, sample the posterior, decode): scored like generated
    images, they are the ceiling of any model in this latent space."""
    generator, out = torch.Generator().manual_seed(seed), []
    for start in range(0, len(images), batch_size):
        pixels = to_pixels(images[start:start + batch_size]).to(ldm.vae.device)
        decoded = ldm.decode_latents(ldm.encode_images(pixels, generator)).float().cpu()
        out.extend(from_pixels(decoded))
    return out


def grounding_metrics(images: list[np.ndarray], layouts: list[dict], detector) -> dict[str, float]:
    """AP / AP50 / AP75 and mIoU of the detector's findings on `images` against their input layouts; with a
    detector that has `coarse_label` (the toy's: colour), also coarse_ap50 / coarse_miou on coarse labels."""
    from .metrics.grounding import coarse_grounding_metrics, grounding_ap, miou

    detections = detector(images)
    metrics = {**grounding_ap(detections, layouts), "miou": miou(detections, layouts)}
    if hasattr(detector, "coarse_label"):
        metrics.update(coarse_grounding_metrics(detections, layouts, detector.coarse_label))
    return metrics


def modality_metrics(images: list[np.ndarray], layouts: list[dict], modality: str, detector=None
                     ) -> dict[str, float]:
    """The modality's own grounding metric of generated `images` against the layouts they were asked for.

    box:               AP / AP50 / AP75 / mIoU of `detector` (a gligen.metrics.grounding.Detector) vs the boxes,
                       label = category (else phrase)
    keypoint:          pck (PCK@0.1), oks_ap / oks_ap50 / oks_ap75 of `detector` (a PoseDetector) vs the persons,
                       and person_ap50 / person_miou (figure placement, joints ignored; toy: ToyPersonDetector,
                       else the box of each detected person's joints)
    image, text_image: entity AP / AP50 / AP75 / mIoU: the detector must find, in each box, the class of the object's
                       reference image (`entity_label`: entity_category, else category, else phrase)
    detector None: the toy world's exact read-back (ToyDetector / ToyPoseDetector).
    """
    from .metrics.grounding import (
        ToyDetector,
        ToyPersonDetector,
        ToyPoseDetector,
        entity_grounding_metrics,
        keypoint_metrics,
    )

    if modality == "keypoint":
        if detector is None:
            return keypoint_metrics(images, layouts, ToyPoseDetector(), person_detector=ToyPersonDetector())
        return keypoint_metrics(images, layouts, detector)
    if modality in ("image", "text_image"):
        return entity_grounding_metrics(images, layouts, detector or ToyDetector())
    if modality == "box":
        return grounding_metrics(images, layouts, detector or ToyDetector())
    raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")


def beta_sweep(ldm: FrozenLDM, layouts: list[dict], references: list[np.ndarray], taus: list[float],
               seeds: list[int], detector, *, sampler: str = "ddim", steps: int = 50, guidance: float = 7.5,
               batch_size: int = 50, clip_dir: str | None = None, inception_weights: str | None = None,
               grid_size: int = 8, progress: bool = True, modality: str | None = None
               ) -> tuple[list[dict], dict[float, list[np.ndarray]]]:
    """Grounding accuracy and quality for every (tau, seed): rows of metrics, and the first `grid_size` images
    of seed `seeds[0]` per tau (for sample grids).

    The layouts are sampled and scored as `modality` (default: `infer_modality`) asks, with that modality's own
    metric (`modality_metrics`: box ap / ap50 / ap75 / miou (+ coarse_*), keypoint pck / oks_ap*, image and
    text_image entity_ap* / entity_miou); `detector` is the modality's detector (a PoseDetector for keypoint),
    None for the toy world's exact read-back."""
    from .metrics.quality import quality_metrics
    from .sampling import tau_schedule

    modality = modality or infer_modality(ldm)
    rows, grids = [], {}
    for tau in taus:
        for seed in seeds:
            images = generate(ldm, layouts, tau_schedule(steps, tau), seed=seed, sampler=sampler, steps=steps,
                              guidance=guidance, batch_size=batch_size, progress=progress, modality=modality)
            row = {"tau": tau, "seed": seed, **modality_metrics(images, layouts, modality, detector)}
            row.update(quality_metrics(_to_tensor(images), _to_tensor(references), clip_dir=clip_dir,
                                       inception_weights=inception_weights))
            rows.append(row)
            if seed == seeds[0]:
                grids[tau] = images[:grid_size]
            if progress:
                print(f"tau={tau} seed={seed}: " + ", ".join(f"{k}={v:.3f}" for k, v in row.items()
                                                             if isinstance(v, float) and k != "tau"))
    return rows, grids


def _to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def to_pixels(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 HxWx3 images -> float [B, 3, H, W] in [-1, 1], the VAE's input range."""
    return _to_tensor(images).float() / 127.5 - 1


def from_pixels(pixels: torch.Tensor) -> list[np.ndarray]:
    """The inverse of `to_pixels`: float [B, 3, H, W] in [-1, 1] -> uint8 HxWx3 images (rounded, clamped)."""
    return list(((pixels.float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
