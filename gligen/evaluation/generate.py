"""Evaluation: layouts -> grounded samples -> grounding accuracy (detector AP vs the input layout) and quality.

Layouts (the data schema's annotation, plus evaluation-only fields) drive every modality:
    {"caption": str,
     "objects": [{"box": [x0, y0, x1, y1], "phrase": str, "category": str | None,
                  "entity_image": path | PIL image | uint8 HxWx3 array (optional),
                  "entity_pixels": float [3, H, W] in [-1, 1] (optional, as the data pipeline's entity crops),
                  "entity_embed": [D] precomputed image-entity feature (optional, wins over the images),
                  "entity_category": str (optional: the reference image's class when it is not `category`)}],
     "persons": [{"keypoints": [[x, y, v] x 17]}]   (normalised; only v = 2 counts as present)}
The modality (gligen.modalities; default: the one the grounded LDM was built for, `modality_of`) turns them into
the position net's keyword arguments (`Modality.layout_inputs`) and scores generated images with its own metric
(`Modality.metrics`).

The paper's protocol, made pluggable: generate one image per validation layout (its caption and boxes), run a
detector on the generated images and score COCO AP / AP50 / AP75 of its detections against the input layout (the
"YOLO score"), plus mIoU; FID / KID against the real validation images. On the toy world the detector is the exact
rule-based one; on real data it is a detector the user names (see gligen.metrics.grounding).
"""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import torch
from tqdm import tqdm

from gligen.constants import MAX_OBJECTS, NUM_KEYPOINTS
from gligen.data.collate import collate_batch
from gligen.data.datamodule import InMemoryShardDataset
from gligen.data.decode import SkipCounter
from gligen.data.shards import resolve_shards
from gligen.data.transforms import TransformConfig
from gligen.ldm import FrozenLDM
from gligen.metrics.quality import quality_metrics
from gligen.metrics.resample import ROW_KEY as RECORDS
from gligen.metrics.resample import MeanRecords, RowRecords
from gligen.modalities import Modality, get_modality, modality_of
from gligen.sampling import sample, tau_schedule

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


def generate(ldm: FrozenLDM, layouts: list[dict], betas: list[float], seed: int = 0, sampler: str = "ddim",
             steps: int = 50, guidance: float = 7.5, batch_size: int = 50, progress: bool = True,
             max_objects: int = MAX_OBJECTS, modality: str | Modality | None = None,
             init_images: list[np.ndarray] | None = None, strength: float = 1.0,
             interrupt=None) -> list[np.ndarray]:
    """One uint8 HxWx3 image per layout; image i depends only on (seed, i, layout i), not on the batching.
    modality: which grounding inputs the layouts become (default: the LDM's, `modality_of`); an LDM without
    grounding layers (the frozen base) samples from the captions alone.
    init_images, strength: SDEdit from these uint8 images (see `sample`), encoded per batch.
    interrupt: see `sample` (raises `SamplingInterrupted`)."""
    grounded = getattr(ldm.unet, "position_net", None) is not None  # else a base LDM: layouts give captions only
    if grounded:
        modality = get_modality(modality) if modality is not None else modality_of(ldm)
    images = []
    starts = range(0, len(layouts), batch_size)
    for start in tqdm(starts, desc=f"sampling seed {seed}", disable=not progress, leave=False):
        chunk = layouts[start:start + batch_size]
        init = None
        if init_images is not None:
            init = ldm.encode_images(to_pixels(init_images[start:start + batch_size]).to(ldm.vae.device),
                                     torch.Generator().manual_seed(seed + start))
        pixels = sample(
            ldm, [layout["caption"] for layout in chunk],
            modality.layout_inputs(ldm, chunk, max_objects) if grounded else None, betas,
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


def score(modality: Modality, images: list[np.ndarray], layouts: list[dict], detector, image_scorer=None
          ) -> tuple[dict[str, float], RowRecords]:
    """`modality.metrics` of the images, and the per-layout records that resample them (gligen.metrics.resample);
    a metric whose records do not give back its value on the full layout set is left out of the records (with a
    warning), so no interval resamples another number than the one reported.

    image_scorer: an ImageScorer, `(images, layouts) -> {metric: [value or None per image]}` (e.g. "toy_image":
    fidelity_error, style_adherence): each metric is its mean over the images it applies to (not None)."""
    records = RowRecords()
    if "records" in inspect.signature(modality.metrics).parameters:
        metrics = modality.metrics(images, layouts, detector, records=records)
    else:  # a modality written without layout records: its intervals do not resample layouts
        metrics = modality.metrics(images, layouts, detector)
    for name, values in (image_scorer(images, layouts) if image_scorer is not None else {}).items():
        counts = [0.0 if v is None else 1.0 for v in values]
        if sum(counts):
            sums = [0.0 if v is None else float(v) for v in values]
            metrics[name] = sum(sums) / sum(counts)
            records.add(name, MeanRecords(sums, counts), {name: "mean"})
    for metric in records.mismatches(metrics):
        warnings.warn(f"{modality.name} {metric}: its layout records do not reproduce its value; its intervals will "
                      "not resample layouts")
        records.drop(metric)
    return metrics, records


def beta_sweep(ldm: FrozenLDM, layouts: list[dict], references: list[np.ndarray], taus: list[float],
               seeds: list[int], detector, *, sampler: str = "ddim", steps: int = 50, guidance: float = 7.5,
               batch_size: int = 50, clip_dir: str | None = None, inception_weights: str | None = None,
               grid_size: int = 8, progress: bool = True, modality: str | Modality | None = None,
               image_scorer=None) -> tuple[list[dict], dict[float, list[np.ndarray]]]:
    """Grounding accuracy and quality for every (tau, seed): rows of metrics, and the first `grid_size` images
    of seed `seeds[0]` per tau (for sample grids).

    The layouts are sampled and scored as `modality` (default: the LDM's, `modality_of`) asks, with that modality's
    own metric (`Modality.metrics`: box ap / ap50 / ap75 / miou (+ coarse_*), keypoint pck / oks_ap*, image and
    text_image entity_ap* / entity_miou); `detector` is the modality's detector (a PoseDetector for keypoint),
    None for the toy world's exact read-back; `image_scorer`: per-image scores (`score`)."""
    modality = get_modality(modality) if modality is not None else modality_of(ldm)
    rows, grids = [], {}
    for tau in taus:
        for seed in seeds:
            images = generate(ldm, layouts, tau_schedule(steps, tau), seed=seed, sampler=sampler, steps=steps,
                              guidance=guidance, batch_size=batch_size, progress=progress, modality=modality)
            metrics, records = score(modality, images, layouts, detector, image_scorer)
            row = {"tau": tau, "seed": seed, **metrics, RECORDS: records}
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
