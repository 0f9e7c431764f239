"""Where the paper's text and the official code (gligen/GLIGEN) differ: one table, two presets.

`preset: paper` (the default) follows the paper, `preset: official` the released code and configs. Every setting
is also an argument of its own (GLIGENModule, GroundingDataModule, `gligen.evaluation.sample`, a converter flag):
given explicitly it wins over the preset; left at None it takes the preset's value for the model's modality.
The README's "Paper vs official code" table lists the same rows (a test keeps the two in step).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

PRESETS = ("paper", "official")
DEFAULT_PRESET = "paper"

# the official inference script's default negative prompt (gligen_inference.py --negative_prompt)
OFFICIAL_NEGATIVE_PROMPT = ("longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, "
                            "cropped, worst quality, low quality")


@dataclass(frozen=True)
class Setting:
    """One behaviour where paper and official code differ. `paper` / `official`: a value, or a dict modality ->
    value (key "*" for the other modalities). `where`: the argument that switches it on its own. `closed`: the
    paper's and the official value are the only ones it takes."""

    name: str
    where: str
    behaviour: str
    paper: Any
    official: Any
    closed: bool = False

    def value(self, preset: str, modality: str | None = None) -> Any:
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
        chosen = self.paper if preset == "paper" else self.official
        if isinstance(chosen, dict):
            return chosen.get(modality, chosen["*"])
        return chosen


SETTINGS = {s.name: s for s in (
    Setting("caption_dropout", "model.caption_dropout", "caption dropout (classifier-free guidance)",
            0.1, {"keypoint": 0.0, "*": 0.5}),  # official keypoint data never drops it (prob_real_caption 1)
    Setting("grounding_dropout_mode", "model.grounding_dropout_mode", "grounding dropout",
            "per_sample", "per_batch", closed=True),  # official: one coin for the whole batch
    Setting("detection_captions", "data.init_args.detection_captions", "detection data caption",
            "null", "category_names", closed=True),  # official make_a_sentence, then the caption dropout coin
    Setting("keypoint_slots", "data.init_args.keypoint_slots", "keypoint person slots",
            "most_visible", "largest", closed=True),
    Setting("keypoint_captions", "data.init_args.keypoint_captions", "keypoint data captions",
            "optional", "required", closed=True),
    Setting("sampler", "sample --sampler", "sampler", "ddim", "plms"),
    Setting("negative_prompt", "sample --negative-prompt", "negative prompt (unconditional branch)",
            "", OFFICIAL_NEGATIVE_PROMPT),
    Setting("alpha_type", "sample --alpha-type / --tau", "scheduled sampling beta",
            (0.3, 0.0, 0.7), {"image": (1.0, 0.0, 0.0), "text_image": (1.0, 0.0, 0.0), "*": (0.3, 0.0, 0.7)}),
)}

# not a run-time setting: how converters crop entity images (python -m gligen.data convert ... --entity-crop)
ENTITY_CROP = Setting("entity_crop", "convert --entity-crop", "entity crop for the image tower", "pad", "stretch")


def resolve(preset: str, modality: str | None = None, **given: Any) -> dict:
    """`given` settings with every None replaced by the preset's value for `modality`; ValueError for a value
    outside a setting's choices."""
    resolved = {name: SETTINGS[name].value(preset, modality) if value is None else value
                for name, value in given.items()}
    for name, value in resolved.items():
        setting = SETTINGS[name]
        if setting.closed and value not in (setting.paper, setting.official):
            raise ValueError(f"{name} must be one of {(setting.paper, setting.official)}, got {value!r}")
    return resolved


# the training config's keys of each setting (model.<name> or data.init_args.<name>)
TRAINING_KEYS = {name: tuple(setting.where.split(".")) for name, setting in SETTINGS.items()
                 if setting.where.startswith(("model.", "data."))}


def with_preset_values(config: dict) -> dict:
    """A training config (LightningCLI's dump) with `model.preset` set (default paper) and every preset setting
    left at None or absent replaced by its value: two configs that train alike compare equal."""
    config = copy.deepcopy(config)
    for name, keys in (("preset", ("model", "preset")), *TRAINING_KEYS.items()):
        node = config
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):  # absent or null: a section of defaults
                node[key] = {}
            node = node[key]
        if node.get(keys[-1]) is None:
            node[keys[-1]] = DEFAULT_PRESET if name == "preset" else SETTINGS[name].value(
                config["model"]["preset"], config["model"].get("modality"))
    return config
