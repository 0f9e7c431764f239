"""Image quality: FID and KID between generated and reference images, through torch-fidelity.

Feature extractors (FID/KID numbers are only comparable within one extractor; always report which one was used,
see `resolve_feature_extractor`):

- ``inception-v3-compat``: torch-fidelity's bit-exact port of the TensorFlow Inception-v3 used by the paper's FID
  (GLIGEN reports FID on COCO with it). Used when the caller passes the weights file (`inception_weights`), or when
  torch-fidelity's download cache already holds them. Nothing is ever downloaded here: the weights must be local.
- ``toy-clip``: the image tower + visual projection of a local ``transformers.CLIPModel`` directory, features
  L2-normalised (the toy analogue of CLIP-FID, Kynkaanniemi et al. 2023). For the toy world this is the better
  extractor anyway: Inception was trained on ImageNet photographs and sees 32 px flat-colour shapes as
  near-identical out-of-distribution blobs, while the toy CLIP (``<pretrained>/clip/``, see
  ``gligen.toy.pretrain``) was trained contrastively on exactly these images and their captions, so its features
  separate colour, shape, count and layout -- the things a toy generator gets right or wrong. Its numbers say
  nothing about Inception-FID and must never be compared with the paper's.

Choice when several are available: explicit `inception_weights` > explicit `clip_dir` > cached Inception weights.
An explicit `clip_dir` wins over the cache so that a result does not silently change extractor with the state of
the machine's cache.

Inputs are a uint8 tensor [N, 3, H, W], a sequence of uint8 HxWx3 arrays or PIL images, or a folder of image files
(read in sorted name order); they reach torch-fidelity as a Dataset of uint8 [3, H, W] tensors. Everything is
deterministic: no data-loader workers, no shuffling, no feature cache, a fixed seed for KID's subsets.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

INCEPTION = "inception-v3-compat"
TOY_CLIP = "toy-clip"
CLIP_FEATURE = "embedding"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DEFAULT_KID_SUBSET_SIZE = 1000  # torch-fidelity's default, capped by the number of samples
KID_SUBSETS = 100
KID_SEED = 2020  # torch-fidelity's default rng_seed
# CLIP directories without a preprocessor config are the toy CLIP, trained on pixels in [-1, 1]
# (gligen.toy.pretrain.train_clip), i.e. mean 0.5 and std 0.5 per channel.
TOY_PIXEL_MEAN = (0.5, 0.5, 0.5)
TOY_PIXEL_STD = (0.5, 0.5, 0.5)

Images = Union[torch.Tensor, Sequence, str, os.PathLike]


# ------------------------------------------------------------------------------------------------------- inputs


class ImageTensorDataset(Dataset):
    """uint8 [3, H, W] images from a uint8 [N, 3, H, W] tensor (torch-fidelity's input format)."""

    def __init__(self, images: torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        self.images = images.cpu()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


class ImageFolderDataset(Dataset):
    """uint8 [3, H, W] RGB images from the image files of a folder, in sorted name order (deterministic)."""

    def __init__(self, folder: str | os.PathLike):
        self.files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise ValueError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)})")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.files[index]) as image:
            return _hwc_to_chw(np.asarray(image.convert("RGB")))


def _hwc_to_chw(image) -> torch.Tensor:
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected a uint8 HxWx3 image, got {array.dtype} {array.shape}")
    return torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1).contiguous()  # copy: PIL arrays are read-only


def as_image_dataset(images: Images) -> Dataset:
    """A Dataset of uint8 [3, H, W] tensors from a [N, 3, H, W] uint8 tensor, HxWx3 arrays / PIL images, or a
    folder."""
    if isinstance(images, (str, os.PathLike)):
        return ImageFolderDataset(images)
    if isinstance(images, torch.Tensor):
        return ImageTensorDataset(images)
    if len(images) == 0:
        raise ValueError("no images")
    return ImageTensorDataset(torch.stack([_hwc_to_chw(im) for im in images]))


# ------------------------------------------------------------------------------------------ CLIP feature extractor


def _pixel_normalisation(clip_dir: str | os.PathLike) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std the CLIP model was trained with: its preprocessor config if saved, else the toy convention."""
    config = Path(clip_dir) / "preprocessor_config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        return tuple(data["image_mean"]), tuple(data["image_std"])
    return TOY_PIXEL_MEAN, TOY_PIXEL_STD


class CLIPImageFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor: L2-normalised CLIP image embeddings of a local CLIPModel directory.

    The directory arrives as torch-fidelity's standard `feature_extractor_weights_path` argument. Images are
    resized (bilinear, antialiased) to the model's square `image_size`, as all toy images are square; real CLIP
    preprocessing would centre-crop non-square images first.
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(f"feature extractor {name!r} needs a CLIPModel directory (feature_extractor_weights_path)")
        from transformers import CLIPModel

        clip = CLIPModel.from_pretrained(feature_extractor_weights_path)
        self.vision_model = clip.vision_model
        self.visual_projection = clip.visual_projection
        self.image_size = int(clip.config.vision_config.image_size)
        mean, std = _pixel_normalisation(feature_extractor_weights_path)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return (CLIP_FEATURE,)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        if metric == "isc":
            raise ValueError("the CLIP feature extractor has no class logits: Inception Score is undefined")
        return CLIP_FEATURE

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 4, 4, dtype=torch.uint8)

    def forward(self, x: torch.Tensor):
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 images [B, 3, H, W], got {x.dtype} {tuple(x.shape)}")
        pixels = x.float() / 255.0
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            pixels = F.interpolate(pixels, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        pixels = (pixels - self.mean) / self.std
        pooled = self.vision_model(pixel_values=pixels).pooler_output
        return (F.normalize(self.visual_projection(pooled), dim=-1).float(),)


def register_clip_extractor() -> None:
    """Register `CLIPImageFeatureExtractor` as "toy-clip" (idempotent: torch-fidelity refuses duplicates)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if TOY_CLIP not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(TOY_CLIP, CLIPImageFeatureExtractor)


# ------------------------------------------------------------------------------------------------------ metrics


def cached_inception_weights() -> Path | None:
    """Inception weights torch-fidelity downloaded earlier (torch hub checkpoint cache), if present."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    path = Path(torch.hub.get_dir()) / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[-1]
    return path if path.is_file() else None


def resolve_feature_extractor(clip_dir: str | os.PathLike | None = None,
                              inception_weights: str | os.PathLike | None = None) -> tuple[str, str]:
    """(torch-fidelity extractor name, its weights path): the extractor `quality_metrics` will use."""
    if inception_weights is not None:
        if not Path(inception_weights).is_file():
            raise FileNotFoundError(f"Inception weights not found: {inception_weights}")
        return INCEPTION, str(inception_weights)
    if clip_dir is not None:
        if not (Path(clip_dir) / "config.json").is_file():
            raise FileNotFoundError(f"{clip_dir}: not a saved transformers CLIPModel directory (no config.json)")
        return TOY_CLIP, str(clip_dir)
    cached = cached_inception_weights()
    if cached is not None:
        return INCEPTION, str(cached)
    raise ValueError(
        "FID/KID need a feature extractor and none is available offline: pass inception_weights=<path to "
        "torch-fidelity's weights-inception-2015-12-05-6726825d.pth> (standard FID), or clip_dir=<a saved "
        "transformers CLIPModel directory, e.g. <pretrained>/clip of the toy LDM> (CLIP-feature FID).")


def auto_kid_subset_size(n_generated: int, n_reference: int, requested: int | None = None) -> int:
    """KID subset size: `requested`, or torch-fidelity's 1000 capped by the smaller set (KID needs >= 2)."""
    available = min(n_generated, n_reference)
    size = min(DEFAULT_KID_SUBSET_SIZE, available) if requested is None else requested
    if size < 2 or size > available:
        raise ValueError(f"KID subset size {size} must lie in [2, {available}] (smaller set has {available} images)")
    return size


def quality_metrics(generated: Images, reference: Images, *, clip_dir: str | os.PathLike | None = None,
                    inception_weights: str | os.PathLike | None = None, kid_subset_size: int | None = None,
                    batch_size: int = 64, cuda: bool | None = None) -> dict[str, float]:
    """{"fid", "kid", "kid_std"} of `generated` against `reference` (see the module docstring for the extractor).

    cuda: run the extractor on the GPU; None uses one when available.
    """
    name, weights = resolve_feature_extractor(clip_dir, inception_weights)
    register_clip_extractor()
    generated_set, reference_set = as_image_dataset(generated), as_image_dataset(reference)
    result = torch_fidelity.calculate_metrics(
        input1=generated_set, input2=reference_set, fid=True, kid=True,
        feature_extractor=name, feature_extractor_weights_path=weights,
        kid_subset_size=auto_kid_subset_size(len(generated_set), len(reference_set), kid_subset_size),
        kid_subsets=KID_SUBSETS, rng_seed=KID_SEED, batch_size=batch_size,
        cuda=torch.cuda.is_available() if cuda is None else cuda,
        cache=False, save_cpu_ram=True, samples_shuffle=False, verbose=False,
    )
    return {"fid": float(result[torch_fidelity.KEY_METRIC_FID]),
            "kid": float(result[torch_fidelity.KEY_METRIC_KID_MEAN]),
            "kid_std": float(result[torch_fidelity.KEY_METRIC_KID_STD])}
