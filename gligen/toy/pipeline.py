"""Build a tiny Stable-Diffusion-shaped pipeline offline and save it as a normal diffusers directory.

Nothing can be downloaded here, so the toy world (and the tests) make their own VAE, CLIP text encoder, CLIP
tokenizer, UNet and scheduler from configs. The directory is then loaded through exactly the same `pretrained`
path (`from_pretrained(dir, subfolder=...)`) as a real SD-1.x hub id or local directory.
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from gligen.ldm import save_ldm, sd_scheduler

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def build_clip_tokenizer(words: list[str], model_max_length: int = 77) -> CLIPTokenizer:
    """A byte-level BPE CLIP tokenizer whose merges make every word in `words` a single token.

    Any other text still tokenizes (byte by byte), exactly like CLIP's own tokenizer falls back.
    """
    byte_chars = list(bytes_to_unicode().values())
    base = byte_chars + [c + "</w>" for c in byte_chars]
    merges: list[tuple[str, str]] = []
    pieces = {word: list(word[:-1]) + [word[-1] + "</w>"] for word in sorted({w.lower() for w in words})}
    while True:
        for symbols in pieces.values():
            while len(symbols) > 1:  # merge the current pieces left to right until the word is one token
                pair = (symbols[0], symbols[1])
                if pair not in merges:
                    merges.append(pair)
                symbols[:2] = [pair[0] + pair[1]]
        vocab_tokens = base + [a + b for a, b in merges] + list(SPECIAL_TOKENS)
        vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab_tokens))}
        tokenizer = CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=model_max_length)
        # an earlier-ranked merge of another word can split a word differently ("an" inside "cyan"): add merges
        # for the pieces BPE actually produces until every word comes out whole
        pieces = {word: tokenizer.tokenize(word) for word in pieces}
        pieces = {word: p for word, p in pieces.items() if len(p) > 1}
        if not pieces:
            return tokenizer


@dataclass
class TinyPipelineConfig:
    """Sizes of a tiny SD-shaped pipeline. Defaults are test-sized; the toy world picks its own."""

    image_size: int = 16
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (16, 32)  # len - 1 downsamplings: 16 px -> 8x8 latents
    unet_channels: tuple[int, ...] = (32, 64)
    unet_down_blocks: tuple[str, ...] = ("CrossAttnDownBlock2D", "DownBlock2D")
    unet_up_blocks: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D")
    unet_layers_per_block: int = 1
    attention_heads: int = 4
    text_width: int = 32
    text_layers: int = 2
    text_heads: int = 4
    norm_num_groups: int = 8
    words: list[str] = field(default_factory=lambda: ["a", "an", "and", "the", "red", "green", "blue",
                                                      "square", "circle", "triangle"])


def build_tiny_pipeline(out_dir: str | Path, config: TinyPipelineConfig | None = None, seed: int = 0) -> Path:
    """Randomly initialise a tiny SD pipeline and `save_pretrained` it to `out_dir` (returned)."""
    config = config or TinyPipelineConfig()
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(config.words)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.text_width,
            intermediate_size=4 * config.text_width,
            num_hidden_layers=config.text_layers,
            num_attention_heads=config.text_heads,
            max_position_embeddings=tokenizer.model_max_length,
            projection_dim=config.text_width,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=config.latent_channels,
        block_out_channels=config.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(config.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(config.vae_channels),
        layers_per_block=1,
        norm_num_groups=config.norm_num_groups,
        sample_size=config.image_size,
    )
    latent_size = config.image_size // 2 ** (len(config.vae_channels) - 1)
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        block_out_channels=config.unet_channels,
        down_block_types=config.unet_down_blocks,
        up_block_types=config.unet_up_blocks,
        layers_per_block=config.unet_layers_per_block,
        cross_attention_dim=config.text_width,
        attention_head_dim=config.attention_heads,  # diffusers' SD-1.x naming: this is the number of heads
        norm_num_groups=config.norm_num_groups,
    )
    return save_ldm(out_dir, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                    scheduler=sd_scheduler())
