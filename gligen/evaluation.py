"""Evaluation: layouts -> grounded samples -> grounding accuracy (detector AP vs the input layout) and quality.

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
from .nn.tokenizers import MAX_OBJECTS
from .sampling import sample

SEED_STRIDE = 1_000_003  # image i of seed s uses generator seed s * SEED_STRIDE + i: independent of batching


def layouts_from_batch(batch: dict) -> list[dict]:
    """A collated batch -> one layout per sample in the schema's form: caption + objects (box, phrase, category)."""
    layouts = []
    for i, caption in enumerate(batch["captions"]):
        objects = []
        for j in batch["masks"][i].nonzero().flatten().tolist():
            category = batch["categories"][i][j] if "categories" in batch else ""
            objects.append({"box": batch["boxes"][i, j].tolist(), "phrase": batch["phrases"][i][j],
                            "category": category or None})
        layouts.append({"key": batch["keys"][i], "caption": caption, "objects": objects})
    return layouts


def load_layouts(spec: str, resolution: int, limit: int | None = None, max_objects: int = MAX_OBJECTS
                 ) -> tuple[list[dict], list[np.ndarray]]:
    """Validation layouts and their real images (uint8 HxWx3), deterministic (centre crop, no flip)."""
    dataset = InMemoryShardDataset(resolve_shards(spec), TransformConfig(resolution, max_objects, random_flip=False),
                                   SkipCounter())
    count = len(dataset) if limit is None else min(limit, len(dataset))
    if count == 0:
        raise ValueError(f"{spec}: no validation samples")
    examples = [dataset[i] for i in range(count)]
    batch = collate_batch(examples)
    if "pixel_values" not in batch:
        raise ValueError(f"{spec}: evaluation needs the real images (these shards carry latents only)")
    images = ((batch["pixel_values"] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return layouts_from_batch(batch), list(images.numpy())


def layout_tensors(layouts: list[dict], max_objects: int = MAX_OBJECTS):
    """Layouts (schema objects: box + phrase) -> boxes [B, N, 4], masks [B, N], phrases (B lists of N, "" padded)."""
    boxes = torch.zeros(len(layouts), max_objects, 4)
    masks = torch.zeros(len(layouts), max_objects)
    phrases = [[""] * max_objects for _ in layouts]
    for i, layout in enumerate(layouts):
        for j, obj in enumerate(layout["objects"][:max_objects]):
            boxes[i, j] = torch.tensor([float(v) for v in obj["box"]])
            masks[i, j] = 1
            phrases[i][j] = str(obj["phrase"])
    return boxes, masks, phrases


def grounding_inputs(ldm: FrozenLDM, layouts: list[dict], max_objects: int = MAX_OBJECTS) -> dict:
    """Box grounding inputs (position net kwargs) for a list of layouts."""
    boxes, masks, phrases = layout_tensors(layouts, max_objects)
    device = ldm.unet.device
    return {"boxes": boxes.to(device), "masks": masks.to(device),
            "positive_embeddings": ldm.encode_phrases(phrases)}


def generate(ldm: FrozenLDM, layouts: list[dict], betas: list[float], seed: int = 0, sampler: str = "ddim",
             steps: int = 50, guidance: float = 7.5, batch_size: int = 50, progress: bool = True,
             max_objects: int = MAX_OBJECTS) -> list[np.ndarray]:
    """One uint8 HxWx3 image per layout; image i depends only on (seed, i, layout i), not on the batching."""
    images = []
    starts = range(0, len(layouts), batch_size)
    for start in tqdm(starts, desc=f"sampling seed {seed}", disable=not progress, leave=False):
        chunk = layouts[start:start + batch_size]
        pixels = sample(
            ldm, [layout["caption"] for layout in chunk], grounding_inputs(ldm, chunk, max_objects), betas,
            sampler=sampler, steps=steps, guidance=guidance,
            seeds=[seed * SEED_STRIDE + start + k for k in range(len(chunk))],
        )
        images.extend((pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return images


def grounding_metrics(images: list[np.ndarray], layouts: list[dict], detector) -> dict[str, float]:
    """AP / AP50 / AP75 and mIoU of the detector's findings on `images` against their input layouts; with a
    detector that has `coarse_label` (the toy's: colour), also coarse_ap50 / coarse_miou on coarse labels."""
    from .metrics.grounding import coarse_grounding_metrics, grounding_ap, miou

    detections = detector(images)
    metrics = {**grounding_ap(detections, layouts), "miou": miou(detections, layouts)}
    if hasattr(detector, "coarse_label"):
        metrics.update(coarse_grounding_metrics(detections, layouts, detector.coarse_label))
    return metrics


def beta_sweep(ldm: FrozenLDM, layouts: list[dict], references: list[np.ndarray], taus: list[float],
               seeds: list[int], detector, *, sampler: str = "ddim", steps: int = 50, guidance: float = 7.5,
               batch_size: int = 50, clip_dir: str | None = None, inception_weights: str | None = None,
               grid_size: int = 8, progress: bool = True) -> tuple[list[dict], dict[float, list[np.ndarray]]]:
    """Grounding accuracy and quality for every (tau, seed): rows of metrics, and the first `grid_size` images
    of seed `seeds[0]` per tau (for sample grids)."""
    from .metrics.quality import quality_metrics
    from .sampling import tau_schedule

    rows, grids = [], {}
    for tau in taus:
        for seed in seeds:
            images = generate(ldm, layouts, tau_schedule(steps, tau), seed=seed, sampler=sampler, steps=steps,
                              guidance=guidance, batch_size=batch_size, progress=progress)
            row = {"tau": tau, "seed": seed, **grounding_metrics(images, layouts, detector)}
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
