"""Tiny schema-v1 samples built in code, for tests and docs (no files, no network)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

from gligen.data.schema import SCHEMA_VERSION


def png_bytes(width: int = 8, height: int = 8, seed: int = 0, fmt: str = "PNG") -> bytes:
    """A small random RGB image, encoded."""
    arr = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def annotation(kind: str = "grounding", boxes: Sequence[Sequence[float]] = ((0.1, 0.2, 0.6, 0.9),),
               phrases: Sequence[str] | None = None, width: int = 8, height: int = 8,
               persons: Sequence[Sequence[Sequence[float]]] | None = None, source_id: str = "test") -> dict:
    """An annotation JSON object (plain dict) for the given boxes, phrases and person keypoints."""
    phrases = list(phrases) if phrases is not None else [f"object {i}" for i in range(len(boxes))]
    obj = {
        "schema_version": SCHEMA_VERSION, "kind": kind, "source_id": source_id, "width": width, "height": height,
        "objects": [{"box": list(b), "phrase": p, "category": p if kind != "grounding" else None,
                     "entity_image": None} for b, p in zip(boxes, phrases)],
    }
    if persons is not None:
        obj["persons"] = [{"keypoints": [list(k) for k in kps]} for kps in persons]
    return obj


def make_sample(key: str, kind: str = "grounding", caption: str = "a test caption", seed: int = 0,
                width: int = 8, height: int = 8, latents: bool = False, embed_dim: int | None = None,
                **annotation_kw) -> dict:
    """A sample dict as ``write_shards`` takes it: png image (or latents), caption, annotation, optional
    caption/phrase embeddings of width ``embed_dim``."""
    ann = annotation(kind, width=width, height=height, **annotation_kw)
    sample = {"__key__": key, "txt": caption, "json": ann}
    rng = np.random.default_rng(seed)
    if latents:
        shape = (4, max(1, height // 8), max(1, width // 8))
        sample["latent_mean.npy"] = rng.standard_normal(shape).astype(np.float32)
        sample["latent_std.npy"] = np.ones(shape, np.float32)
        sample["latent_mean_flip.npy"] = sample["latent_mean.npy"][..., ::-1].copy()
        sample["latent_std_flip.npy"] = np.ones(shape, np.float32)
    else:
        sample["png"] = png_bytes(width, height, seed)
    if embed_dim is not None:
        sample["caption_embeds.npy"] = rng.standard_normal((77, embed_dim)).astype(np.float32)
        sample["phrase_embeds.npy"] = rng.standard_normal((len(ann["objects"]), embed_dim)).astype(np.float32)
    return sample
