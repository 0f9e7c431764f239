"""`Modality`: the interface every grounding modality implements, and the registry that finds one by name."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from gligen.constants import MAX_OBJECTS, MAX_PERSONS

DEFAULT_MODALITY = "box"  # the paper's main setting; results rows without a modality column are box rows


class Modality:
    """One grounding modality. Subclasses set the class attributes and implement the methods that raise here.

    Attributes:
        name: the `modality` hyper-parameter value (recorded in checkpoints and exported UNet configs).
        family: which layouts it grounds: "objects" (boxes) or "persons" (keypoints); the toy world and the
            evaluation read that family of validation data.
        entity_images: the data pipeline must give each object's reference image (`data.entity_images`).
        primary_metric: the class / joint aware grounding metric it is ranked by.
        placement_metric: placement alone (class-agnostic; measured where the detector can tell, e.g. the toy's).
        metric_names: every grounding metric `metrics` returns, in report order.
        diffusers_pipeline, diffusers_attention_type: the diffusers pipeline that runs it (None: none exists).
        official_tokenizer: the official code's grounding_tokenizer module name (None: no official variant).
        official_marker: a state-dict key only the official variant's position_net has.
    """

    name: str
    family: str = "objects"
    entity_images: bool = False
    primary_metric: str
    placement_metric: str
    metric_names: tuple[str, ...] = ()
    diffusers_pipeline: str | None = None
    diffusers_attention_type: str | None = None
    official_tokenizer: str | None = None
    official_marker: str | None = None

    # ----- the model side ---------------------------------------------------------------------------------------
    def position_net(self, token_dim: int, text_dim: int, max_persons: int = MAX_PERSONS,
                     position_encoding: str = "fourier") -> torch.nn.Module | None:
        """The grounding tokenizer; None = `add_grounding`'s default (text + box). `position_encoding`: how its MLP
        sees coordinates (gligen.nn.fourier.position_features: "fourier", paper; "raw", the paper's ablation); a
        modality whose position_net takes no such argument is only ever asked for "fourier"."""
        raise NotImplementedError

    def batch_inputs(self, ldm, batch: Mapping, *, training: bool = False, generator: torch.Generator | None = None,
                     check: bool = True, max_objects: int = MAX_OBJECTS, max_persons: int = MAX_PERSONS) -> dict:
        """A batch (the data pipeline's keys, see docs/batch_contract.md) -> the position net's keyword arguments
        (`cross_attention_kwargs["gligen"]`). `training`: random per-box drops where the modality has them;
        `check`: validate the inputs first (names the bad sample)."""
        raise NotImplementedError

    def check_batch(self, batch: Mapping, max_objects: int = MAX_OBJECTS, max_persons: int = MAX_PERSONS, *,
                    user_layout: bool = False) -> None:
        """Raise `GroundingInputError` naming the sample (`batch["keys"]`) if the grounding inputs are malformed.
        `user_layout`: stricter rules for layouts a user wrote (e.g. every object of an image layout needs an
        image); training data may have objects without them."""
        raise NotImplementedError

    def null_grounding(self, grounding: dict, drop: torch.Tensor) -> dict:
        """Samples where `drop` is True lose their grounding (classifier-free guidance): every mask zeroed, so the
        tokenizer substitutes its learned null features."""
        keep = ~drop
        return {k: v * keep.view(-1, *[1] * (v.ndim - 1)).to(v.dtype) if k.endswith("masks") else v
                for k, v in grounding.items()}

    # ----- layouts (sampling, evaluation) -----------------------------------------------------------------------
    def layouts_batch(self, layouts: list[dict], max_objects: int = MAX_OBJECTS, max_persons: int = MAX_PERSONS,
                      ldm=None) -> dict:
        """Layouts (the schema's annotation form) -> the batch keys `batch_inputs` reads. With `ldm`, features
        that need an encoder (image entities) are encoded too; without, only what `check_batch` needs."""
        raise NotImplementedError

    def layout_inputs(self, ldm, layouts: list[dict], max_objects: int = MAX_OBJECTS,
                      max_persons: int | None = None) -> dict:
        """Layouts -> the position net's keyword arguments on the UNet's device: the training code path
        (`batch_inputs`) applied to `layouts_batch`."""
        if max_persons is None:
            max_persons = getattr(getattr(ldm.unet, "position_net", None), "max_persons", MAX_PERSONS)
        batch = self.layouts_batch(layouts, max_objects, max_persons, ldm=ldm)
        grounding = self.batch_inputs(ldm, batch, check=False, max_objects=max_objects, max_persons=max_persons)
        device, dtype = ldm.unet.device, ldm.unet.dtype
        return {k: v.to(device, dtype) if k.endswith("embeddings") else v.to(device) for k, v in grounding.items()}

    def check_layouts(self, layouts: list[dict], source: str) -> None:
        """Raise ValueError if evaluation layouts from `source` cannot ground this modality at all."""

    # ----- scoring ----------------------------------------------------------------------------------------------
    def detector(self, config: Mapping):
        """The detector `metrics` scores with, from an experiment config (`detector` / `pose_detector` keys);
        None = the toy world's exact read-back."""
        raise NotImplementedError

    def metrics(self, images: list[np.ndarray], layouts: list[dict], detector=None, records=None
                ) -> dict[str, float]:
        """This modality's grounding metrics of generated `images` against the layouts they were asked for;
        `records` (a gligen.metrics.resample.RowRecords): filled with the metrics' per-layout records."""
        raise NotImplementedError

    def headline_metric(self, row: Mapping) -> str:
        """The metric a sweep row is plotted and summarised by: placement where measured, else the primary one."""
        for metric in (self.placement_metric, self.primary_metric):
            if row.get(metric) not in (None, ""):
                return metric
        raise ValueError(f"no grounding metric of {self.name} ({self.placement_metric}, {self.primary_metric}) in "
                         f"{sorted(row)}")

    # ----- interop ----------------------------------------------------------------------------------------------
    def diffusers_problems(self, position_net: torch.nn.Module, width: int) -> list[str]:
        """Why diffusers' GLIGEN UNet could not hold this position net (empty: exportable)."""
        return [f"modality is {self.name!r}; diffusers has no GLIGEN pipeline for it"]

    def official_position_net(self, shape, width: int, text_width: int) -> tuple[torch.nn.Module, dict]:
        """Our tokenizer for the official variant's position_net, sized by `shape(name)` (its tensor shapes), and
        the GLIGENModule hyper-parameters that rebuild it. Raises ValueError for sizes the module cannot build."""
        raise ValueError(f"modality {self.name!r} has no official GLIGEN variant")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def fourier_freqs(position_dim: int, coords: int) -> int:
    """Frequencies of a Fourier position feature of `position_dim` dims over `coords` coordinates."""
    freqs, rest = divmod(position_dim, 2 * coords)
    if rest:
        raise ValueError(f"official position_net: position feature of {position_dim} dims is no Fourier one")
    return freqs


_REGISTRY: dict[str, Modality] = {}


def register_modality(modality: Modality) -> Modality:
    """Make `modality` known by its name (replacing one of the same name)."""
    _REGISTRY[modality.name] = modality
    return modality


def unregister_modality(name: str) -> None:
    _REGISTRY.pop(name, None)


def modality_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_modality(name: str | Modality) -> Modality:
    if isinstance(name, Modality):
        return name
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"modality must be one of {modality_names()}, got {name!r}") from None


def modality_of(ldm) -> Modality:
    """The modality a grounded LDM was built for: `GLIGENModule` records it (`ldm.grounding_modality`); never
    guessed from the position net's type."""
    name = getattr(ldm, "grounding_modality", None)
    if name is None:
        raise ValueError("this LDM has no recorded grounding modality (load it with GLIGENModule.from_checkpoint, "
                         "or pass modality=)")
    return get_modality(name)
