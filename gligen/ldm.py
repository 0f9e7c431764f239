"""The frozen latent diffusion model: VAE, CLIP text encoder + tokenizer, UNet and the training noise schedule.

`pretrained` is anything diffusers' `from_pretrained` accepts: a hub id (e.g. an SD-1.x repo) or a local Stable
Diffusion directory (`model_index.json`, `vae/`, `text_encoder/`, `tokenizer/`, `unet/`, `scheduler/`). The toy
world writes such a directory, so toy and SD share this code path.
"""

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer


class FrozenLDM(nn.Module):
    """Frozen SD components with the encoders GLIGEN training needs. Every parameter has requires_grad=False."""

    def __init__(self, pretrained: str):
        super().__init__()
        self.pretrained = pretrained
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
