"""The frozen latent diffusion model: VAE, CLIP text encoder + tokenizer, UNet and the training noise schedule.

`pretrained` is anything diffusers' `from_pretrained` accepts: a hub id (e.g. an SD-1.x repo) or a local Stable
Diffusion directory (`model_index.json`, `vae/`, `text_encoder/`, `tokenizer/`, `unet/`, `scheduler/`). The toy
world writes such a directory, so toy and SD share this code path.

Image entities (text + image grounding) need a CLIP image tower whose text tower is the SD text encoder: a whole
transformers `CLIPModel` directory (`clip`; default `<pretrained>/clip` when that exists, which the toy LDM writes;
for SD-1.x a local openai/clip-vit-large-patch14). It is loaded on first use only.
"""

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from torch import nn
from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

from gligen.constants import CLIP_SUBFOLDER
from gligen.nn.tokenizers import IMAGE_FEATURE_NORM, project_image_embeddings

log = logging.getLogger(__name__)

# CLIPImageProcessor defaults of the OpenAI CLIP checkpoints (used when the CLIP directory has no
# preprocessor_config.json)
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

FINGERPRINT_COMPONENTS = ("unet", "vae", "text_encoder")


def weights_fingerprint(pretrained: str, samples: int = 16, chunk: int = 4096) -> str | None:
    """A cheap content fingerprint of a local diffusers directory's frozen weights (None for a hub id).

    Hashes each component's config, weight-file sizes and `samples` evenly spaced chunks of every weight file: any
    retraining changes bytes everywhere, while an SD-1.x UNet (3.4 GB) is fingerprinted in milliseconds. Checkpoints
    carry it so grounding layers are not silently loaded onto a base they were not trained on."""
    root = Path(pretrained)
    if not root.is_dir():
        return None
    digest = hashlib.sha256()
    for component in FINGERPRINT_COMPONENTS:
        for path in sorted((root / component).glob("*")):
            if path.name == "config.json":
                digest.update(path.read_bytes())
            elif path.suffix in (".safetensors", ".bin"):
                size = path.stat().st_size
                digest.update(f"{component}/{path.name}:{size}".encode())
                with open(path, "rb") as f:
                    for k in range(samples):
                        f.seek(k * max(0, size - chunk) // max(1, samples - 1))
                        digest.update(f.read(chunk))
    return digest.hexdigest()[:16]


def ldm_clip_dir(pretrained: str | os.PathLike) -> str | None:
    """The CLIPModel directory an LDM directory holds (<pretrained>/clip), or None when it has none."""
    path = os.path.join(str(pretrained), CLIP_SUBFOLDER)
    return path if os.path.isdir(path) else None


class FrozenLDM(nn.Module):
    """Frozen SD components with the encoders GLIGEN training needs. Every parameter has requires_grad=False."""

    def __init__(self, pretrained: str, clip: str | None = None,
                 clip_image_mean: tuple[float, float, float] | None = None,
                 clip_image_std: tuple[float, float, float] | None = None):
        super().__init__()
        self.pretrained = pretrained
        self.clip_path = clip if clip is not None else ldm_clip_dir(pretrained)
        self.clip_image_mean, self.clip_image_std = clip_image_mean, clip_image_std  # None: from the CLIP dir
        self._clip: list = []  # the lazily loaded CLIPModel, in a list so that it is no submodule (state_dict, .to)
        self.tokenizer = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder")
        self.vae = AutoencoderKL.from_pretrained(pretrained, subfolder="vae")
        self.unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet")
        # training always uses the DDPM forward process with the pipeline's own betas and prediction type
        self.noise_scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler")
        # the pipeline's own scheduler settings (steps_offset, set_alpha_to_one, ...) for the samplers
        self.scheduler_config = dict(DDPMScheduler.load_config(pretrained, subfolder="scheduler"))
        self.requires_grad_(False)
        self.eval()

    @property
    def scaling_factor(self) -> float:
        return self.vae.config.scaling_factor

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.text_encoder.device)

    @torch.no_grad()
    def encode_captions(self, captions: list[str]) -> torch.Tensor:
        """Caption token features [B, 77, D] (last hidden state), the UNet's cross-attention context."""
        return self.text_encoder(self.tokenize(captions)).last_hidden_state

    @torch.no_grad()
    def encode_phrases(self, phrases: list[list[str]]) -> torch.Tensor:
        """Pooled CLIP text features [B, N, D] of every phrase (EOS token after the final layer norm, before the
        projection); "" (padding) gives zeros. Each distinct phrase in the batch is encoded once."""
        batch, num = len(phrases), max((len(p) for p in phrases), default=0)
        out = torch.zeros(batch, num, self.text_encoder.config.hidden_size, device=self.text_encoder.device)
        unique = sorted({p for sample in phrases for p in sample if p})
        if not unique:
            return out
        # CLIP's causal mask makes the EOS feature independent of padding after it: pad to the longest only
        ids = self.tokenizer(unique, padding=True, truncation=True, return_tensors="pt").input_ids
        pooled = self.text_encoder(ids.to(out.device)).pooler_output
        index = {p: k for k, p in enumerate(unique)}
        for i, sample in enumerate(phrases):
            for j, p in enumerate(sample):
                if p:
                    out[i, j] = pooled[index[p]]
        return out

    # ----- image entities ----------------------------------------------------------------------------------------
    @property
    def has_clip(self) -> bool:
        """Whether an image tower is configured (`encode_entity_images` can run)."""
        return self.clip_path is not None

    def set_clip(self, clip: str | None) -> None:
        """Use another CLIP directory for image entities (unloads the current one)."""
        self.clip_path = clip
        self._clip.clear()

    @property
    def clip_model(self) -> CLIPModel:
        """The CLIPModel of `clip_path`, loaded on first use, frozen, on the text encoder's device."""
        if self.clip_path is None:
            raise ValueError(f"no CLIP model for image entities: {self.pretrained}/clip does not exist and no "
                             "`clip` directory was given (SD-1.x: a local openai/clip-vit-large-patch14)")
        if not self._clip:
            clip = CLIPModel.from_pretrained(self.clip_path).requires_grad_(False).eval()
            width = clip.config.text_config.hidden_size
            if width != self.text_encoder.config.hidden_size:
                raise ValueError(f"CLIP {self.clip_path}: text width {width} differs from the text encoder's "
                                 f"{self.text_encoder.config.hidden_size}: it is not the CLIP of this LDM")
            mine = clip.text_model.embeddings.token_embedding.weight
            theirs = self.text_encoder.get_input_embeddings().weight
            if mine.shape != theirs.shape or not torch.allclose(mine, theirs.float().cpu(), atol=1e-3):
                log.warning("CLIP %s: its text tower differs from the text encoder of %s; image entities are "
                            "projected with this CLIP's text projection, which is not the text space the phrases use",
                            self.clip_path, self.pretrained)
            self._clip.append(clip)
            self._clip_preprocessing = self._load_preprocessing(clip)
        clip = self._clip[0]
        device = self.text_encoder.device
        if clip.device != device:
            clip.to(device)
        return clip

    def _load_preprocessing(self, clip: CLIPModel) -> dict:
        """Resize / crop size and normalisation: the model's image_size (CLIPImageProcessor resizes the short side
        to it, bicubic, then centre crops it), mean/std from preprocessor_config.json or the OpenAI defaults."""
        cfg: dict = {}
        path = os.path.join(self.clip_path, "preprocessor_config.json")
        if os.path.isfile(path):
            with open(path) as f:
                cfg = json.load(f)
        return {"size": int(clip.config.vision_config.image_size),
                "mean": tuple(self.clip_image_mean or cfg.get("image_mean") or CLIP_IMAGE_MEAN),
                "std": tuple(self.clip_image_std or cfg.get("image_std") or CLIP_IMAGE_STD)}

    def clip_pixels(self, images) -> torch.Tensor:
        """Entity images -> normalised CLIP input [K, 3, S, S] (S = the vision tower's image_size).

        `images`: a list of PIL images, or a float tensor [K, 3, H, W] in [-1, 1] (the repo's pixel convention).
        As CLIPImageProcessor: short side resized to S (bicubic; PIL's for PIL input, antialiased torch bicubic
        for tensors), centre crop S x S (offsets rounded down), values in [0, 1] normalised by the mean and std.
        """
        self.clip_model  # noqa: B018 (loads the preprocessing settings with the model)
        prep = self._clip_preprocessing
        size = prep["size"]
        out = []
        for image in (images if isinstance(images, (list, tuple)) else list(images)):
            if isinstance(image, Image.Image):
                image = image.convert("RGB")
                w, h = image.size
                if min(w, h) != size:
                    short, long = (w, h) if w <= h else (h, w)
                    long = int(size * long / short)
                    image = image.resize((size, long) if w <= h else (long, size), Image.BICUBIC)
                px = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255.0
            else:
                px = (image.float() + 1) / 2
                h, w = px.shape[-2:]
                if min(w, h) != size:
                    short, long = (w, h) if w <= h else (h, w)
                    long = int(size * long / short)
                    new = (long, size) if w <= h else (size, long)  # (H, W)
                    px = F.interpolate(px[None], size=new, mode="bicubic", antialias=True, align_corners=False)[0]
                    px = px.clamp(0, 1)
            h, w = px.shape[-2:]
            top, left = (h - size) // 2, (w - size) // 2
            out.append(px[:, top:top + size, left:left + size])
        pixels = torch.stack(out)
        mean = torch.tensor(prep["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(prep["std"]).view(1, 3, 1, 1)
        return (pixels - mean) / std

    @torch.no_grad()
    def encode_entity_images(self, images, norm: float = IMAGE_FEATURE_NORM) -> torch.Tensor:
        """Image-entity features [K, D] in text-feature space (official GLIGEN `which_layer_image="after_reproject"`).

        CLIP image embedding (`CLIPModel.get_image_features`: pooled vision output through the visual projection)
        times the transpose of the SAME CLIPModel's text projection, renormalised to unit length and scaled to
        `norm` (28.7): `project_image_embeddings`. `images` as in `clip_pixels`.
        """
        clip = self.clip_model
        if len(images) == 0:
            return torch.zeros(0, self.text_encoder.config.hidden_size, device=self.text_encoder.device)
        pixels = self.clip_pixels(images).to(clip.device, clip.dtype)
        features = clip.get_image_features(pixel_values=pixels)
        if not torch.is_tensor(features):  # transformers >= 5 returns the vision output, projected pooler_output
            features = features.pooler_output
        return project_image_embeddings(features, clip.text_projection.weight, norm)

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] -> scaled latents sampled from the VAE posterior."""
        posterior = self.vae.encode(pixel_values.to(self.vae.dtype)).latent_dist
        return posterior.sample(generator) * self.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> pixels in [-1, 1]."""
        return self.vae.decode(latents.to(self.vae.dtype) / self.scaling_factor).sample.clamp(-1, 1)


def sd_scheduler() -> DDIMScheduler:
    """The SD-1.x noise schedule (scaled-linear betas 0.00085..0.012 over 1000 steps, epsilon prediction) with the
    sampler settings SD pipelines ship (steps_offset 1, no clipping)."""
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def save_ldm(out_dir: str | Path, *, vae, text_encoder, tokenizer, unet, scheduler) -> Path:
    """Write the components as a standard diffusers Stable Diffusion directory (what `pretrained` names)."""
    StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(out_dir)
    return Path(out_dir)
