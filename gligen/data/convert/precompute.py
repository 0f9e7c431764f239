"""``python -m gligen.data precompute``: add frozen-model outputs to shards so training skips the VAE and CLIP.

For every valid sample (read with the safe reader) this writes, next to the original members:
``latent_mean.npy``/``latent_std.npy`` (VAE posterior of the image centre-cropped to ``resolution`` exactly as
validation crops it; ``_flip`` variants of the mirrored crop with ``flip``), ``caption_embeds.npy`` [77, D]
(``FrozenLDM.encode_captions``; the null caption for ``detection``) and ``phrase_embeds.npy`` [n_objects, D]
(``FrozenLDM.encode_phrases``), and for samples with entity images (``objects[*].entity_image``)
``entity_embeds.npy`` [n_objects, D] (``FrozenLDM.encode_entity_images`` of each object's entity image, zeros for
objects without one; needs a CLIP directory, ``clip``, default ``<pretrained>/clip``). An entity embedding describes
the reference image, not the scene, so it has no ``_flip`` variant.

Latents fix the geometry (docs/data.md: boxes refer to the image the latents encode), so the annotation is rewritten
into the crop with the training transforms: boxes mapped, clipped and filtered (``min_area``, ``max_objects``),
keypoints mapped, width = height = resolution. Per-object rows (``entity_embeds.npy``) follow the kept objects.
The stored image becomes that crop (PNG), so image, latents and annotation agree; ``image="drop"`` stores none.
Samples that already carry latents keep their latents and annotation; only their embeddings are (re)computed.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from gligen.constants import NUM_KEYPOINTS
from gligen.data.decode import SkipCounter
from gligen.data.schema import ANNOTATION_MEMBER, Annotation, DecodedSample, member_category
from gligen.data.shards import decode_or_skip, iter_raw_samples, resolve_shards, write_shards
from gligen.data.transforms import (
    MAX_OBJECTS,
    Crop,
    choose_crop,
    crop_boxes,
    crop_keypoints,
    filter_boxes,
    image_to_tensor,
    resize_short_side,
)

REPORT_FILE = "precompute_report.json"
ENTITY_CHUNK = 64  # entity images per CLIP forward
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrecomputeConfig:
    resolution: int
    flip: bool = False
    min_area: float = 0.01  # same default as TransformConfig: training re-applies the filter, to the same effect
    max_objects: int = MAX_OBJECTS
    image: str = "crop"  # "crop": store the crop the latents encode; "drop": latents only
    batch_size: int = 16
    dtype: str = "float32"


@dataclass
class Prepared:
    """One sample's inputs to the frozen models and its rewritten annotation."""

    sample: DecodedSample
    raw: dict
    annotation: dict
    kept: np.ndarray  # indices of the input objects kept, in their new order
    crop: Image.Image | None  # None: the sample already has latents

    @property
    def phrases(self) -> list[str]:
        return [self.annotation["objects"][i]["phrase"] for i in range(len(self.kept))]

    @property
    def has_entity_images(self) -> bool:
        """Whether the sample names entity images (then it gets ``entity_embeds.npy``, rows for the kept objects)."""
        return any(o.entity_image is not None for o in self.sample.annotation.objects)

    @property
    def entity_members(self) -> list[str | None]:
        """Entity image member of every kept object (None: no image)."""
        return [self.sample.annotation.objects[i].entity_image for i in self.kept]

    @property
    def caption(self) -> str:
        return "" if self.annotation["kind"] == "detection" else self.sample.caption  # as transform_sample does


def centre_crop(image: Image.Image, resolution: int) -> tuple[Image.Image, Crop]:
    """Resize short side + centre crop: the validation geometry of ``transform_sample``."""
    resized = resize_short_side(image, resolution)
    crop = choose_crop(*resized.size, resolution)
    return resized.crop((crop.left, crop.top, crop.left + crop.size, crop.top + crop.size)), crop


def cropped_annotation(ann: Annotation, crop: Crop, min_area: float, max_objects: int) -> tuple[dict, np.ndarray]:
    """The annotation of the crop: boxes mapped, clipped, filtered like training does (largest first), keypoints
    mapped (those outside become unlabelled). Returns (annotation JSON, kept object indices)."""
    boxes = crop_boxes(np.array([o.box for o in ann.objects], dtype=np.float64).reshape(-1, 4), crop)
    boxes, kept = filter_boxes(boxes, min_area, max_objects)
    positive = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # min_area=0 would let slivers through
    boxes, kept = boxes[positive], kept[positive]
    out = ann.to_json()
    out["width"] = out["height"] = crop.size
    out["objects"] = [dict(ann.objects[i].to_json(), box=[float(c) for c in box]) for box, i in zip(boxes, kept)]
    if ann.persons is not None:
        kps = np.stack([p.keypoints for p in ann.persons]) if ann.persons else np.zeros((0, NUM_KEYPOINTS, 3))
        out["persons"] = [{"keypoints": [[float(x), float(y), int(v)] for x, y, v in person]}
                          for person in crop_keypoints(kps, crop)]
    return out, kept


def prepare(raw: dict, sample: DecodedSample, cfg: PrecomputeConfig) -> Prepared:
    if sample.image is None:  # latents present: geometry already fixed
        return Prepared(sample, raw, sample.annotation.to_json(), np.arange(len(sample.annotation.objects)), None)
    image, crop = centre_crop(sample.image, cfg.resolution)
    annotation, kept = cropped_annotation(sample.annotation, crop, cfg.min_area, cfg.max_objects)
    return Prepared(sample, raw, annotation, kept, image)


@torch.no_grad()
def vae_posterior(ldm, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled posterior mean and std (the module samples and applies the scaling factor itself)."""
    dist = ldm.vae.encode(pixels.to(ldm.vae.device, ldm.vae.dtype)).latent_dist
    return dist.mean, dist.std


def entity_embeds(ldm, batch: list[Prepared]) -> list[np.ndarray | None]:
    """``entity_embeds.npy`` rows [n_kept, D] (float32) of every sample that names entity images, else None. Each
    entity image (sample, member) is encoded once; objects without an image get zeros."""
    index: dict[tuple[int, str], int] = {}
    images = []
    for i, p in enumerate(batch):
        for member in p.entity_members if p.has_entity_images else []:
            if member is not None and (i, member) not in index:
                index[(i, member)] = len(images)
                images.append(p.sample.entity_images[member])
    chunks = [ldm.encode_entity_images(images[k:k + ENTITY_CHUNK]).float().cpu().numpy()
              for k in range(0, len(images), ENTITY_CHUNK)]
    width = ldm.text_encoder.config.hidden_size
    features = np.concatenate(chunks) if chunks else np.zeros((0, width), np.float32)
    out: list[np.ndarray | None] = []
    for i, p in enumerate(batch):
        if not p.has_entity_images:
            out.append(None)
            continue
        rows = np.zeros((len(p.kept), width), np.float32)
        for j, member in enumerate(p.entity_members):
            if member is not None:
                rows[j] = features[index[(i, member)]]
        out.append(rows)
    return out


def encode_batch(ldm, batch: list[Prepared], cfg: PrecomputeConfig,
                 stats: Counter | None = None) -> list[dict[str, np.ndarray]]:
    """Member name -> array for every prepared sample of the batch. ``stats`` counts entity-embedding outcomes."""
    dtype = np.dtype(cfg.dtype)
    out: list[dict[str, np.ndarray]] = [{} for _ in batch]
    with_image = [i for i, p in enumerate(batch) if p.crop is not None]
    if with_image:
        pixels = torch.stack([image_to_tensor(batch[i].crop) for i in with_image])
        variants = [("", pixels)] + ([("_flip", pixels.flip(-1))] if cfg.flip else [])  # flip(-1) == mirrored crop
        for suffix, px in variants:
            mean, std = vae_posterior(ldm, px)
            for row, i in enumerate(with_image):
                out[i][f"latent_mean{suffix}.npy"] = mean[row].float().cpu().numpy().astype(dtype)
                out[i][f"latent_std{suffix}.npy"] = std[row].float().cpu().numpy().astype(dtype)
    captions = ldm.encode_captions([p.caption for p in batch]).float().cpu().numpy()
    phrases = ldm.encode_phrases([p.phrases for p in batch]).float().cpu().numpy()
    for i, p in enumerate(batch):
        out[i]["caption_embeds.npy"] = captions[i].astype(dtype)
        out[i]["phrase_embeds.npy"] = phrases[i, :len(p.kept)].astype(dtype)
    with_entities = sum(p.has_entity_images for p in batch)
    if with_entities and not ldm.has_clip:
        # no image tower: entity images stay in the shard, stored entity_embeds rows (if any) follow the objects
        if stats is not None:
            stats["entity_images_without_clip"] += with_entities
    elif with_entities:
        for i, rows in enumerate(entity_embeds(ldm, batch)):
            if rows is not None:
                out[i]["entity_embeds.npy"] = rows.astype(dtype)
        if stats is not None:
            stats["entity_embeds"] += with_entities
    return out


def output_sample(p: Prepared, arrays: dict[str, np.ndarray], cfg: PrecomputeConfig) -> dict[str, Any]:
    """Original members, with the image replaced by the crop, the annotation rewritten and arrays added."""
    sample: dict[str, Any] = {"__key__": p.sample.key}
    for member, data in p.raw.items():
        if member.startswith("__") or member in arrays or member == ANNOTATION_MEMBER:
            continue  # replaced: the input's own copies must not survive next to the new ones
        category = member_category(member)
        if category == "image" and p.crop is not None:
            continue  # replaced by the crop below
        if category == "caption":
            sample[member] = p.sample.caption
        elif category == "array":  # per-object rows follow the kept objects
            array = p.sample.arrays[member]
            sample[member] = array[p.kept] if member == "entity_embeds.npy" else array
        else:
            sample[member] = data
    if p.crop is not None and cfg.image == "crop":
        buf = io.BytesIO()
        p.crop.save(buf, format="PNG")  # lossless: the stored image is exactly what the latents encode
        sample["png"] = buf.getvalue()
    sample[ANNOTATION_MEMBER] = p.annotation
    sample.update(arrays)
    return sample


def _batches(items: Iterable[Prepared], size: int) -> Iterator[list[Prepared]]:
    batch: list[Prepared] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def precomputed_samples(ldm, urls: list[str], cfg: PrecomputeConfig, skips: SkipCounter,
                        stats: Counter | None = None) -> Iterator[dict]:
    def prepared() -> Iterator[Prepared]:
        for url in urls:
            for raw in iter_raw_samples(url, skips):
                sample = decode_or_skip(raw, skips)
                if sample is not None:
                    yield prepare(raw, sample, cfg)

    for batch in _batches(prepared(), cfg.batch_size):
        for p, arrays in zip(batch, encode_batch(ldm, batch, cfg, stats)):
            yield output_sample(p, arrays, cfg)


def precompute_shards(pretrained: str, shards: str, out_dir: str, cfg: PrecomputeConfig, device: str | None = None,
                      prefix: str = "shard", max_samples: int = 1000, progress: bool = True, ldm=None,
                      clip: str | None = None) -> dict:
    """Read ``shards``, write the precomputed set to ``out_dir``; returns the index. ``ldm`` reuses a loaded
    FrozenLDM (tests); otherwise ``pretrained`` is loaded onto ``device`` (default: cuda when available).
    ``clip``: CLIP directory for entity images (default: ``<pretrained>/clip`` when it exists)."""
    if cfg.image not in ("crop", "drop"):
        raise ValueError(f"image must be 'crop' or 'drop', got {cfg.image!r}")
    urls = resolve_shards(shards)
    out_real = os.path.realpath(out_dir)
    inside = [u for u in urls if "://" not in u and not u.startswith("pipe:")
              and os.path.realpath(u).startswith(out_real + os.sep)]
    if inside:  # writing there would truncate shards before (or while) they are read
        raise ValueError(f"--out {out_dir} holds the input shards ({inside[0]}{' ...' if len(inside) > 1 else ''}): "
                         "write the precomputed set to another directory")
    if ldm is None:
        from gligen.ldm import FrozenLDM  # heavy import, only when the command runs

        ldm = FrozenLDM(pretrained, clip=clip).to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    elif clip is not None:
        ldm.set_clip(clip)
    skips = SkipCounter(strict=False)
    stats: Counter = Counter()
    index = write_shards(precomputed_samples(ldm, urls, cfg, skips, stats), out_dir,
                         prefix=prefix, max_samples=max_samples, progress=progress)
    if stats["entity_images_without_clip"]:
        log.warning("%d samples have entity images but no CLIP directory was found (--clip, default "
                    "<pretrained>/clip): no entity_embeds computed for them", stats["entity_images_without_clip"])
    report = {"pretrained": pretrained, "clip": ldm.clip_path, "shards": shards, "config": asdict(cfg),
              "written": index["total"], "skipped": skips.summary(), "entity": dict(stats)}
    with open(os.path.join(out_dir, REPORT_FILE), "w") as f:
        json.dump(report, f, indent=1)
    return index


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("precompute", help="add VAE latents and CLIP embeddings to shards")
    parser.add_argument("--pretrained", required=True, help="SD directory or hub id (FrozenLDM)")
    parser.add_argument("--clip", default=None,
                        help="CLIP directory (transformers CLIPModel whose text tower is the SD text encoder, e.g. a "
                             "local openai/clip-vit-large-patch14) for entity_embeds; default <pretrained>/clip")
    parser.add_argument("--shards", required=True, help="input shard spec (directory, index.json, pattern)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--resolution", type=int, default=512, help="training resolution: the crop that is encoded")
    parser.add_argument("--flip", action="store_true", help="also encode the mirrored crop (_flip latents)")
    parser.add_argument("--min-area", type=float, default=0.01, help="drop boxes smaller than this (as training)")
    parser.add_argument("--max-objects", type=int, default=MAX_OBJECTS)
    parser.add_argument("--image", choices=("crop", "drop"), default="crop",
                        help="store the encoded crop as png (default) or no image")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="stored array dtype")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--prefix", default="shard")
    parser.add_argument("--max-samples", type=int, default=1000, help="samples per output shard")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    cfg = PrecomputeConfig(args.resolution, args.flip, args.min_area, args.max_objects, args.image, args.batch_size,
                           args.dtype)
    index = precompute_shards(args.pretrained, args.shards, args.out, cfg, args.device, args.prefix,
                              args.max_samples, not args.no_progress, clip=args.clip)
    with open(os.path.join(args.out, REPORT_FILE)) as f:
        print(json.dumps(json.load(f)["skipped"]), file=sys.stderr)
    print(json.dumps({"total": index["total"], "kinds": index["kinds"], "shards": len(index["shards"])}))
    return 0
