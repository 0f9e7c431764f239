"""Grounding modalities: everything that differs between box, keypoint and image-entity grounding, one file each.

A modality (`base.Modality`) owns its grounding tokenizer (`position_net`), how a training batch and how a layout
become the tokenizer's inputs (one code path: layouts are turned into a batch first), input checks, null grounding,
its metric and metric names, and its official / diffusers names. Code elsewhere looks a modality up by name:

    from gligen.modalities import get_modality
    grounding = get_modality("keypoint").layout_inputs(ldm, layouts)

A new modality is a subclass registered with `register_modality` (see tests/modalities/test_registry.py, which
adds one from the test file alone).
"""

from gligen.modalities.base import (
    DEFAULT_MODALITY,
    Modality,
    get_modality,
    modality_names,
    modality_of,
    register_modality,
    unregister_modality,
)
from gligen.modalities.box import BoxModality
from gligen.modalities.entity import EntityModality
from gligen.modalities.keypoint import KeypointModality

register_modality(BoxModality())
register_modality(KeypointModality())
register_modality(EntityModality("image", text=False))
register_modality(EntityModality("text_image", text=True))

__all__ = [
    "DEFAULT_MODALITY",
    "BoxModality",
    "EntityModality",
    "KeypointModality",
    "Modality",
    "get_modality",
    "modality_names",
    "modality_of",
    "register_modality",
    "unregister_modality",
]
