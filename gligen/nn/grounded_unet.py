"""Turn a frozen diffusers `UNet2DConditionModel` into a GLIGEN UNet.

A `Fuser` goes into every `BasicTransformerBlock` (between self- and cross-attention) and a grounding tokenizer
becomes `unet.position_net`. This reuses diffusers' own GLIGEN hooks: the UNet calls
`position_net(**cross_attention_kwargs["gligen"])` once per forward and every block calls `block.fuser(x, objs)`,
so the state dict has exactly the keys of `UNet2DConditionModel(attention_type="gated")` and exporting to
diffusers is a save. Without `cross_attention_kwargs["gligen"]` the UNet is the untouched base model.
"""

from collections.abc import Iterator

from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from torch import nn

from gligen.nn.fuser import Fuser
from gligen.nn.tokenizers import TextBoxTokenizer


def transformer_blocks(unet: nn.Module) -> Iterator[tuple[str, BasicTransformerBlock]]:
    for name, module in unet.named_modules():
        if isinstance(module, BasicTransformerBlock):
            yield name, module


def fusers(unet: nn.Module) -> Iterator[tuple[str, Fuser]]:
    """(block name, fuser) for every fuser, in UNet order."""
    for name, block in transformer_blocks(unet):
        if isinstance(getattr(block, "fuser", None), Fuser):
            yield name, block.fuser


def add_grounding(
    unet: UNet2DConditionModel,
    position_net: nn.Module | None = None,
    fuser_type: str = "gated_self_attention",
    gamma_init: float = 0.0,
) -> UNet2DConditionModel:
    """Freeze `unet` and attach fusers and a grounding tokenizer in place; returns the same UNet.

    `position_net` defaults to the box + phrase tokenizer sized like diffusers' (phrase width = token width =
    cross-attention width). Only fusers and position_net require grad afterwards.
    """
    blocks = list(transformer_blocks(unet))
    if not blocks:
        raise ValueError("the UNet has no BasicTransformerBlock: nowhere to insert fusers")
    if any(hasattr(block, "fuser") for _, block in blocks):
        raise ValueError("the UNet already has fusers; load it as a plain text-to-image UNet")
    unet.requires_grad_(False)
    context_dim = unet.config.cross_attention_dim
    for _, block in blocks:
        # diffusers: heads = attn1.heads, head dim = inner width / heads (SD-1.x: 8 heads of C/8)
        block.fuser = Fuser(
            query_dim=block.attn1.query_dim,
            context_dim=context_dim,
            n_heads=block.attn1.heads,
            d_head=block.attn1.inner_dim // block.attn1.heads,
            fuser_type=fuser_type,
            gamma_init=gamma_init,
        )
    unet.position_net = position_net or TextBoxTokenizer(positive_len=context_dim, out_dim=context_dim)
    # record it in the config so `save_pretrained` writes a UNet diffusers rebuilds with fusers
    unet.register_to_config(attention_type="gated")
    num_fusers = sum(1 for _ in fusers(unet))
    if num_fusers != len(blocks):
        raise RuntimeError(f"expected {len(blocks)} fusers, found {num_fusers}")
    return unet


def grounding_modules(unet: nn.Module) -> nn.ModuleDict:
    """The trainable part: every fuser and the position net (shares parameters with the UNet)."""
    modules = {name.replace(".", "/"): fuser for name, fuser in fusers(unet)}
    modules["position_net"] = unet.position_net
    return nn.ModuleDict(modules)


def set_beta(unet: nn.Module, beta: float) -> None:
    """Scheduled sampling: multiply every fuser's residual by `beta` (0 switches grounding off exactly)."""
    for _, fuser in fusers(unet):
        fuser.beta = float(beta)
