"""Collate transformed examples into the batch of docs/batch_contract.md."""

from __future__ import annotations

from collections import Counter

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
    if any(e.get("category_caption") for e in examples):  # detection captions written from category names
        batch["category_captions"] = [bool(e.get("category_caption")) for e in examples]
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


# ----------------------------------------------------------------------------------- shapes a batch can stack
FORMS = {"image form": "image_form_mismatch", "entity form": "image_form_mismatch"}


def example_signature(example: dict) -> dict:
    """What must agree across a batch for ``collate_batch`` to stack it: every tensor's shape, the image form
    (latents or pixels) and the entity form (precomputed embeddings or images)."""
    sig: dict = {name: tuple(v.shape) for name, v in example.items() if isinstance(v, torch.Tensor)}
    sig["image form"] = "latents" if "latent_mean" in example else "pixels"
    if "entity_embeds" in example or "entity_pixel_values" in example:
        sig["entity form"] = "embeddings" if "entity_embeds" in example else "images"
    return sig


class BatchShapes:
    """The expected per-example shapes of a stream's batches, checked before stacking so that one sample of
    another shape (latents or embeddings of another size, an image-only sample in a latents source) is a counted
    skip instead of a failed ``torch.stack``.

    The expectation is the majority over the first candidates that show an entry (``settle``; ties go to the
    first seen) and then stays fixed, so a damaged first sample cannot impose its shape on the rest."""

    def __init__(self):
        self.expected: dict = {}

    def settle(self, signatures: list[dict]) -> None:
        """Fix the expectation of entries not seen before from the majority of ``signatures``."""
        votes: dict[str, Counter] = {}
        for sig in signatures:
            for name, value in sig.items():
                if name not in self.expected:
                    votes.setdefault(name, Counter())[value] += 1
        for name, counter in votes.items():
            self.expected[name] = counter.most_common(1)[0][0]

    def mismatch(self, signature: dict) -> tuple[str, str] | None:
        """``(reason, message)`` when ``signature`` disagrees with the expectation, else None."""
        for name, value in signature.items():
            want = self.expected.get(name)
            if want is not None and value != want:
                return FORMS.get(name, "shape_mismatch"), f"{name} is {value}, the batch's is {want}"
        return None
