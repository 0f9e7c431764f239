"""Collate transformed examples into the batch of docs/batch_contract.md."""

from __future__ import annotations

import torch

# optional tensors: present in the batch only when every example has them (the module then prefers them)
ALL_OR_NOTHING = ("caption_embeds", "phrase_embeds", "entity_embeds")


def collate_batch(examples: list[dict]) -> dict:
    """Stack examples from ``transform_sample``.

    Image side: ``latent_mean``/``latent_std`` when every example has latents, else ``pixel_values``; a batch
    mixing the two is an error (give every data kind the same image form). ``captions`` and ``phrases`` are always
    there; embeddings only when every example carries them. ``keypoints``/``keypoint_masks`` when any example
    has a person annotation (zeros for the others); likewise ``entity_pixel_values``/``entity_masks`` when any
    example carries entity images (zeros and mask 0 for the others). A batch mixing precomputed
    ``entity_embeds`` with entity images to encode is an error, like mixing latents and pixels."""
    if not examples:
        raise ValueError("empty batch")
    batch: dict = {
        "keys": [e["key"] for e in examples],
        "kinds": [e["kind"] for e in examples],
        "captions": [e["caption"] for e in examples],
        "phrases": [e["phrases"] for e in examples],
        "categories": [e["categories"] for e in examples],
        "boxes": torch.stack([e["boxes"] for e in examples]),
        "masks": torch.stack([e["masks"] for e in examples]),
    }
    if all("latent_mean" in e for e in examples):
        batch["latent_mean"] = torch.stack([e["latent_mean"] for e in examples])
        batch["latent_std"] = torch.stack([e["latent_std"] for e in examples])
    elif all("pixel_values" in e for e in examples):
        batch["pixel_values"] = torch.stack([e["pixel_values"] for e in examples])
    else:
        raise ValueError(f"batch mixes latent and pixel samples: {batch['keys']}")
    for name in ALL_OR_NOTHING:
        if all(name in e for e in examples):
            batch[name] = torch.stack([e[name] for e in examples])
    stack_where_any(batch, examples, "keypoints", "keypoint_masks")
    if any("entity_pixel_values" in e for e in examples) and any("entity_embeds" in e for e in examples):
        raise ValueError(f"batch mixes precomputed entity_embeds and entity images: {batch['keys']}")
    stack_where_any(batch, examples, "entity_pixel_values", "entity_masks")
    return batch


def stack_where_any(batch: dict, examples: list[dict], *names: str) -> None:
    """Stack ``names`` when any example has the first of them; examples without get zeros."""
    having = [e for e in examples if names[0] in e]
    if having:
        for name in names:
            zeros = torch.zeros_like(having[0][name])
            batch[name] = torch.stack([e.get(name, zeros) for e in examples])
