"""Detectors by name: what `detector: toy` / `pose_detector: toy` in a config means, without this package
importing the toy world (`gligen.toy` sits above it; its read-back detectors are found here by import path).

    make_detector("toy")                       # the toy world's exact box read-back
    make_detector("my_pkg.pose:detect")        # "module:callable": a user's Detector / PoseDetector, used as is
    make_detector("facebook/detr-resnet-50")   # anything else: a transformers object detector (directory or hub id)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from gligen.metrics.transformers_detector import TransformersDetector

# name -> "module:factory" (imported on first use) or a factory; register more with `register_detector`
DETECTORS: dict[str, str | Callable] = {
    "toy": "gligen.toy.evaluate:ToyDetector",
    "toy_pose": "gligen.toy.evaluate:ToyPoseDetector",
    "toy_person": "gligen.toy.evaluate:ToyPersonDetector",
    "toy_image": "gligen.toy.fidelity:ToyImageScorer",  # an ImageScorer: per-image fidelity and style adherence
}


def register_detector(name: str, factory: str | Callable) -> None:
    DETECTORS[name] = factory


def import_path(spec: str):
    """"module:name" -> that attribute."""
    module, _, name = str(spec).partition(":")
    if not module or not name:
        raise ValueError(f"detector {spec!r}: expected 'module:callable'")
    return getattr(importlib.import_module(module), name)


def make_image_scorer(spec):
    """An ImageScorer from a config value (`make_detector`'s names and forms), None for none. An ImageScorer maps
    (images, layouts) to {metric: [value, or None where it does not apply, per image]}."""
    return make_detector(spec) if spec else None


def make_detector(spec):
    """A detector from a config value: a registered name (instantiated), "module:callable" (returned as is), a
    callable (as is), else a transformers object-detection model directory / hub id."""
    if callable(spec):
        return spec
    if spec in DETECTORS:
        factory = DETECTORS[spec]
        return (import_path(factory) if isinstance(factory, str) else factory)()
    if ":" in str(spec) and not str(spec).startswith(("/", ".")):
        return import_path(spec)
    return TransformersDetector(spec)
