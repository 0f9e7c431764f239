"""Pretrain the toy world's latent diffusion model on CPU, then save it as a diffusers SD directory.

Three short stages, each a plain training loop (they run once per machine, in minutes; a Lightning loop per stage
would add start-up cost and nothing a researcher needs to configure):
1. CLIP: a tiny text tower and image tower trained contrastively on (scene, caption) pairs, so text and image
   features share one space as with real CLIP. The text tower becomes the SD `text_encoder`; the whole CLIP model
   is kept in `clip/` for image-entity grounding.
2. VAE: an `AutoencoderKL` (32 px -> 8x8x4 latents), then the latent scaling factor = 1 / std of the latents,
   computed as SD's 0.18215 was.
3. UNet: a text-to-image `UNet2DConditionModel` on the latents (captions only, no boxes; 10% null captions for
   classifier-free guidance), with an EMA of the weights.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel, compute_snr
from tqdm import tqdm
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextModel

from gligen.constants import CLIP_SUBFOLDER
from gligen.data.decode import SkipCounter
from gligen.data.shards import iter_samples
from gligen.ldm import save_ldm, sd_scheduler
from gligen.toy import world
from gligen.toy.pipeline import build_clip_tokenizer


@dataclass
class PretrainConfig:
    seed: int = 0
    batch_size: int = 64
    # CLIP towers
    text_width: int = 64
    text_layers: int = 2
    vision_patch: int = 8
    clip_steps: int = 1500  # at 400 the toy CLIP told shapes apart little better than chance (world version 2)
    clip_lr: float = 1e-3
    # VAE: len(vae_channels) - 1 downsamplings
    vae_channels: tuple[int, ...] = (16, 32, 32)
    vae_steps: int = 1500
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    # UNet
    unet_channels: tuple[int, ...] = (32, 64, 64)
    unet_down_blocks: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    unet_up_blocks: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    attention_heads: int = 4
    unet_steps: int = 4000
    unet_lr: float = 5e-4
    unet_warmup: int = 200
    caption_dropout: float = 0.1
    snr_gamma: float | None = None  # Min-SNR loss weighting (Hang et al. 2023); None = plain epsilon MSE
    ema_decay: float = 0.999
    extra_words: list[str] = field(default_factory=list)


def toy_vocabulary() -> list[str]:
    """Every word the toy world writes (colours, shapes, caption templates), one token each."""
    words = set(world.COLOURS) | set(world.SHAPES) | set(world.STYLES) | {"a", "an", "and"}
    for template in world.CAPTION_TEMPLATES:
        words |= set(template.replace("{}", " ").replace(",", " ").split())
    for caption in world.PERSON_CAPTIONS:
        words |= set(caption.split())
    return sorted(words)


def caption_ids(tokenizer, texts: list[str]) -> torch.Tensor:
    """Token ids [N, max_length], padded as the pipeline pads (FrozenLDM.tokenize; no LDM exists yet here)."""
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    for _ in range(steps):
        yield torch.randint(0, n, (batch_size,), generator=generator)


def _cosine_lr(optimizer, step: int, steps: int, base: float, warmup: int) -> None:
    if step < warmup:
        lr = base * (step + 1) / warmup
    else:
        lr = base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    for group in optimizer.param_groups:
        group["lr"] = lr


def _contrastive_step(clip: CLIPModel, ids: torch.Tensor, pixels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    # identical texts in a batch would be false negatives: keep the first of each
    _, first = np.unique(ids[index].numpy(), axis=0, return_index=True)
    index = index[torch.as_tensor(np.sort(first))]
    return clip(input_ids=ids[index], pixel_values=pixels[index], return_loss=True).loss


def train_clip(images: torch.Tensor, captions: list[str], tokenizer, config: PretrainConfig, log,
               entity_images: torch.Tensor | None = None, entity_phrases: list[str] | None = None) -> CLIPModel:
    """Contrastive text/image towers; images [N, 3, H, W] in [-1, 1].

    With `entity_images` (single objects) and their phrases, every step also contrasts a batch of (entity image,
    phrase) pairs. Why: in scene batches colour alone tells most captions apart, so scene-only training leaves the
    shape words nearly collinear (measured: cosine 0.97 between "circle" and "square" features after 200 steps), and
    the UNet and GLIGEN then never learn shapes. Among single objects, only the shape tells "red circle" from "red
    square"; these pairs are also what image-entity grounding needs (entity image features in phrase space).
    """
    width = config.text_width
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width,
                         num_hidden_layers=config.text_layers, num_attention_heads=4,
                         max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(image_size=images.shape[-1], patch_size=config.vision_patch, hidden_size=width,
                           intermediate_size=4 * width, num_hidden_layers=2, num_attention_heads=4),
        projection_dim=width,
    ))

    ids = caption_ids(tokenizer, captions)
    entity_ids = caption_ids(tokenizer, entity_phrases) if entity_images is not None else None
    optimizer = torch.optim.AdamW(clip.parameters(), lr=config.clip_lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(config.seed)
    clip.train()
    bar = tqdm(_batches(len(images), 128, config.clip_steps, generator), total=config.clip_steps, desc="toy CLIP")
    for step, index in enumerate(bar):
        _cosine_lr(optimizer, step, config.clip_steps, config.clip_lr, 50)
        loss = _contrastive_step(clip, ids, images, index)
        if entity_ids is not None:
            entity_index = torch.randint(0, len(entity_images), (128,), generator=generator)
            loss = loss + _contrastive_step(clip, entity_ids, entity_images, entity_index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    log(f"clip: final contrastive loss {loss.item():.3f}")
    return clip.eval()


def text_encoder_from_clip(clip: CLIPModel) -> CLIPTextModel:
    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.load_state_dict(clip.text_model.state_dict())  # transformers 5: CLIPModel.text_model is one
    return text_encoder.eval()


@torch.no_grad()
def latent_means(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The posterior means of images [N, 3, H, W] in [-1, 1], unscaled, in batches."""
    return torch.cat([vae.encode(images[i:i + batch_size]).latent_dist.mean for i in range(0, len(images), batch_size)])


def train_vae(images: torch.Tensor, config: PretrainConfig, log) -> tuple[AutoencoderKL, torch.Tensor]:
    """The toy VAE and the scaled posterior means of `images` (the UNet's training latents; encoded once, they
    also set the scaling factor)."""
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=config.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(config.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(config.vae_channels),
        layers_per_block=1, norm_num_groups=16, sample_size=images.shape[-1],
    )
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr)
    generator = torch.Generator().manual_seed(config.seed + 1)
    bar = tqdm(_batches(len(images), config.batch_size, config.vae_steps, generator), total=config.vae_steps,
               desc="toy VAE")
    vae.train()
    for step, index in enumerate(bar):
        _cosine_lr(optimizer, step, config.vae_steps, config.vae_lr, 100)
        x = images[index]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        recon = F.l1_loss(reconstruction, x) + F.mse_loss(reconstruction, x)
        loss = recon + config.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(recon=f"{recon.item():.4f}")
    vae.eval()
    latents = latent_means(vae, images)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    log(f"vae: final reconstruction loss {recon.item():.4f}, scaling factor {vae.config.scaling_factor:.4f}")
    return vae, latents * vae.config.scaling_factor


def make_unet(config: PretrainConfig, latent_size: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4,
        block_out_channels=config.unet_channels, down_block_types=config.unet_down_blocks,
        up_block_types=config.unet_up_blocks, layers_per_block=1, cross_attention_dim=config.text_width,
        attention_head_dim=config.attention_heads, norm_num_groups=16,
    )


@torch.no_grad()
def encode_captions(captions: list[str], tokenizer, text_encoder, batch_size: int = 256) -> torch.Tensor:
    """The text encoder's last hidden states [N, max_length, width] of captions, padded as the pipeline pads."""
    out = []
    for i in range(0, len(captions), batch_size):
        out.append(text_encoder(caption_ids(tokenizer, captions[i:i + batch_size])).last_hidden_state)
    return torch.cat(out)


def train_unet(latents: torch.Tensor, captions: list[str], tokenizer, text_encoder, config: PretrainConfig,
               log) -> UNet2DConditionModel:
    """Text-to-image UNet on scaled latents [N, 4, h, w]."""
    unet = make_unet(config, latents.shape[-1])
    ema = EMAModel(unet.parameters(), decay=config.ema_decay)
    noise_scheduler = DDPMScheduler.from_config(sd_scheduler().config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.unet_lr, weight_decay=0.0)
    # every distinct caption encoded once (a few thousand among tens of thousands of images): the frozen text
    # encoder per step was about a sixth of this stage's time
    distinct = sorted(set(captions) | {""})
    row = {caption: i for i, caption in enumerate(distinct)}
    caption_rows = torch.tensor([row[caption] for caption in captions])
    contexts = encode_captions(distinct, tokenizer, text_encoder)
    null_context = contexts[row[""]]
    generator = torch.Generator().manual_seed(config.seed + 2)
    unet.train()
    bar = tqdm(_batches(len(latents), config.batch_size, config.unet_steps, generator), total=config.unet_steps,
               desc="toy UNet")
    for step, index in enumerate(bar):
        _cosine_lr(optimizer, step, config.unet_steps, config.unet_lr, config.unet_warmup)
        x0 = latents[index]
        context = contexts[caption_rows[index]]
        drop = torch.rand(len(index), generator=generator) < config.caption_dropout
        context[drop] = null_context
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        prediction = unet(noise_scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=context).sample
        loss = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
        if config.snr_gamma is not None:
            snr = compute_snr(noise_scheduler, t)
            loss = loss * snr.clamp(max=config.snr_gamma) / snr
        loss = loss.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        ema.step(unet.parameters())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    ema.copy_to(unet.parameters())
    log(f"unet: final loss {loss.item():.4f} (EMA weights saved)")
    return unet.eval()


def load_split_arrays(shards: list[str], with_entities: bool = False):
    """Images [N, 3, H, W] in [-1, 1] and captions of the given shards, through the project's safe reader.
    With `with_entities`, also every object's entity image [M, 3, H, W] and its phrase."""
    skips = SkipCounter(strict=True)  # the toy world writes these shards itself: any damage is a bug
    images, captions, entities, phrases = [], [], [], []
    for sample in iter_samples(shards, skips):
        images.append(np.asarray(sample.image.convert("RGB")))
        captions.append(sample.caption)
        for obj in sample.annotation.objects:
            if with_entities and obj.entity_image is not None:
                entities.append(np.asarray(sample.entity_images[obj.entity_image].convert("RGB")))
                phrases.append(obj.phrase)

    def pixels(arrays: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1

    if not with_entities:
        return pixels(images), captions
    return pixels(images), captions, (pixels(entities) if entities else None), phrases


def pretrain(train_shards: list[str], out_dir: str | Path, config: PretrainConfig | None = None, log=print,
             record: dict | None = None) -> Path:
    """Run the three stages on the training shards and save the pipeline to `out_dir`; `record` (what the data
    was) is kept in `toy_pretrain.json` beside the config."""
    config = config or PretrainConfig()
    out_dir = Path(out_dir)
    torch.manual_seed(config.seed)
    start = time.time()
    stages = {}  # seconds per stage: where a build's time goes (the build budget is quoted per processor class)

    def lap(stage: str) -> None:
        stages[stage] = round(time.time() - start - sum(stages.values()), 1)

    images, captions, entity_images, entity_phrases = load_split_arrays(train_shards, with_entities=True)
    log(f"pretraining data: {len(images)} images from {len(train_shards)} shards, "
        f"{0 if entity_images is None else len(entity_images)} entity images")
    lap("data")
    tokenizer = build_clip_tokenizer(toy_vocabulary() + list(config.extra_words))
    clip = train_clip(images, captions, tokenizer, config, log, entity_images, entity_phrases)
    text_encoder = text_encoder_from_clip(clip)
    text_encoder.requires_grad_(False)
    lap("clip")
    vae, latents = train_vae(images, config, log)
    lap("vae")
    unet = train_unet(latents, captions, tokenizer, text_encoder, config, log)
    lap("unet")
    save_ldm(out_dir, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sd_scheduler())
    clip.save_pretrained(out_dir / CLIP_SUBFOLDER)
    # the toy CLIP saw pixels in [-1, 1], i.e. CLIP normalisation with mean = std = 0.5 (not OpenAI's statistics)
    size = images.shape[-1]
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                       image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(out_dir / CLIP_SUBFOLDER)
    (out_dir / "toy_pretrain.json").write_text(
        json.dumps({"config": asdict(config), **(record or {}), "seconds": round(time.time() - start, 1),
                    "stage_seconds": stages, "train_images": len(images)}, indent=1))
    log(f"saved toy LDM to {out_dir} in {time.time() - start:.0f} s")
    return out_dir
