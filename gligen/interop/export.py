"""GLIGENModule checkpoint -> a diffusers pipeline directory (box: StableDiffusionGLIGENPipeline; text_image / image:
StableDiffusionGLIGENTextImagePipeline), or this project's format for modalities diffusers has no pipeline for."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import diffusers
import lightning
import torch
from diffusers import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.clip_image_project_model import CLIPImageProjection
from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from gligen.interop.safe_load import InteropError
from gligen.ldm import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD, save_ldm
from gligen.module import CHECKPOINT_FORMAT, GLIGENModule
from gligen.nn.grounded_unet import fusers

try:  # moved to `deprecated` in recent diffusers; the top-level name is kept as an alias while it lasts
    from diffusers import StableDiffusionGLIGENPipeline
except ImportError:  # pragma: no cover - depends on the installed diffusers
    from diffusers.pipelines.deprecated.stable_diffusion_gligen import StableDiffusionGLIGENPipeline
try:
    from diffusers import StableDiffusionGLIGENTextImagePipeline
except ImportError:  # pragma: no cover - depends on the installed diffusers
    from diffusers.pipelines.deprecated.stable_diffusion_gligen import StableDiffusionGLIGENTextImagePipeline



def check_exportable(module: GLIGENModule) -> None:
    """diffusers' GLIGEN UNets have one fixed design: gated self-attention fusers and a position net with 8 Fourier
    frequencies whose entity width is the token width (text+box, or text+image+box for `gated-text-image`).
    Anything else would load with wrong or missing weights."""
    hp = module.hparams
    width = module.ldm.unet.config.cross_attention_dim
    problems = module.modality.diffusers_problems(module.ldm.unet.position_net, width)
    if hp.fuser_type != "gated_self_attention":
        problems.append(
            f"fuser_type is {hp.fuser_type!r}, diffusers' GatedSelfAttentionDense is 'gated_self_attention'"
        )
    if problems:
        raise InteropError("cannot export to diffusers: " + "; ".join(problems))


def export_to_diffusers(checkpoint: str | Path, out_dir: str | Path, pretrained: str | None = None) -> Path:
    """Write a directory that diffusers' GLIGEN pipeline of the checkpoint's modality loads as is:
    `StableDiffusionGLIGENPipeline.from_pretrained(out_dir)` (box) or
    `StableDiffusionGLIGENTextImagePipeline.from_pretrained(out_dir)` (text_image, image).

    The UNet is the grounded UNet (config `attention_type="gated"` / `"gated-text-image"`, so diffusers rebuilds its
    fusers and position net and fills them from our weights); VAE, text encoder, tokenizer and scheduler are those of
    `pretrained` (default: the one recorded in the checkpoint). No safety checker is written (the frozen LDM has
    none either). Keypoint checkpoints have no diffusers pipeline: they go to `export_keypoint`.
    """
    module = GLIGENModule.from_checkpoint(str(checkpoint), pretrained)
    if module.modality.diffusers_pipeline is None:
        return export_keypoint(module, out_dir)
    check_exportable(module)
    ldm = module.ldm
    pipeline_name, attention_type = module.modality.diffusers_pipeline, module.modality.diffusers_attention_type
    # recorded, so whoever loads the directory never has to guess (diffusers ignores the extra key)
    ldm.unet.register_to_config(gligen_modality=module.modality.name)
    # the sampling scheduler of the base pipeline (PNDM for SD-1.x, DDIM for the toy), not the training DDPM
    scheduler_class = _diffusers_class(ldm.scheduler_config["_class_name"])
    scheduler = scheduler_class.from_config(ldm.scheduler_config)
    common = {"vae": ldm.vae, "text_encoder": ldm.text_encoder, "tokenizer": ldm.tokenizer, "unet": ldm.unet,
              "scheduler": scheduler, "safety_checker": None, "feature_extractor": None,
              "requires_safety_checker": False}
    if attention_type == "gated":
        pipeline = StableDiffusionGLIGENPipeline(**common)
    else:
        ldm.unet.register_to_config(attention_type=attention_type)  # a throwaway module: its config is ours to set
        pipeline = StableDiffusionGLIGENTextImagePipeline(**common, **image_entity_components(ldm))
    out_dir = Path(out_dir)
    pipeline.save_pretrained(out_dir)
    # without the right attention_type diffusers would drop every fuser weight or build the wrong position net
    unet_config = json.loads((out_dir / "unet" / "config.json").read_text())
    if unet_config.get("attention_type") != attention_type:
        raise InteropError(
            f"{out_dir}/unet/config.json has attention_type {unet_config.get('attention_type')!r}, "
            f"{pipeline_name} needs {attention_type!r}"
        )
    return out_dir


def image_entity_components(ldm) -> dict:
    """`processor`, `image_encoder`, `image_project` of StableDiffusionGLIGENTextImagePipeline from the LDM's CLIP.

    The pipeline computes an image entity as `image_project(image_encoder(processor(image)).image_embeds)`,
    renormalised to 28.7; we compute `get_image_features(pixels) @ text_projection.weight`, renormalised to 28.7
    (`FrozenLDM.encode_entity_images`). So: image_encoder = the CLIP vision tower with its visual projection (the
    same weights), image_project = Linear(x) = x @ text_projection.weight, i.e. weight = text_projection.weight.T.
    diffusers' CLIPImageProjection is square (hidden_size -> hidden_size), so CLIP's projection width must equal
    the text width (true for SD-1.x's CLIP ViT-L/14: 768 and 768). The processor is CLIPImageProcessor with the
    CLIP directory's preprocessing (resize short side, centre crop, normalise), or CLIP's defaults without one.
    """
    try:
        clip: CLIPModel = ldm.clip_model
    except ValueError as error:  # no `<pretrained>/clip`
        raise InteropError(f"cannot export image entities to diffusers: {error}") from None
    text_width = ldm.text_encoder.config.hidden_size
    projection = clip.config.projection_dim
    if projection != text_width:
        raise InteropError(
            f"cannot export image entities to diffusers: CLIP {ldm.clip_path} projects to {projection} dims, the "
            f"text encoder is {text_width} wide; diffusers' CLIPImageProjection is square ({text_width} -> "
            f"{text_width}), so projection width must equal text width (it does for SD-1.x's CLIP ViT-L/14)"
        )
    vision_config = CLIPVisionConfig.from_dict({**clip.config.vision_config.to_dict(), "projection_dim": projection})
    image_encoder = CLIPVisionModelWithProjection(vision_config)
    vision = {k: v for k, v in clip.state_dict().items() if k.startswith(("vision_model.", "visual_projection."))}
    image_encoder.load_state_dict(vision, strict=True)
    image_project = CLIPImageProjection(hidden_size=text_width)
    with torch.no_grad():
        image_project.project.weight.copy_(clip.text_projection.weight.T)
    preprocessor = Path(ldm.clip_path) / "preprocessor_config.json"
    if preprocessor.is_file():
        image_processor = CLIPImageProcessor.from_pretrained(ldm.clip_path)
    else:
        size = int(clip.config.vision_config.image_size)
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size},
            image_mean=list(CLIP_IMAGE_MEAN), image_std=list(CLIP_IMAGE_STD),
        )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=ldm.tokenizer)
    return {"processor": processor, "image_encoder": image_encoder.eval(), "image_project": image_project.eval()}


def export_keypoint(module: GLIGENModule, out_dir: str | Path) -> Path:
    """Keypoint models in this project's format (diffusers has no keypoint pipeline): `out_dir/pretrained/` (the
    frozen LDM as a diffusers SD directory) and `out_dir/gligen.ckpt` (fusers + keypoint position_net, every
    hyper-parameter, `pretrained` pointing at the directory next to it).

    Load with `GLIGENModule.from_checkpoint("out_dir/gligen.ckpt")`: its `.ldm.unet` is a diffusers
    `UNet2DConditionModel` with fusers and the keypoint tokenizer as `position_net`, so diffusers' UNet forward
    takes `cross_attention_kwargs={"gligen": {"points": [B, P, 17, 2], "masks": [B, P, 17]}}`; sample with
    `gligen.sampling.sample` or `python -m gligen.evaluation.sample --ckpt out_dir/gligen.ckpt`."""
    out_dir = Path(out_dir)
    ldm = module.ldm
    pretrained = (out_dir / "pretrained").resolve()
    scheduler = _diffusers_class(ldm.scheduler_config["_class_name"]).from_config(ldm.scheduler_config)
    save_ldm(pretrained, vae=ldm.vae, text_encoder=ldm.text_encoder, tokenizer=ldm.tokenizer,
             unet=_plain_unet(ldm.unet), scheduler=scheduler)
    hparams = {k: v for k, v in dict(module.hparams).items() if k != "pretrained"}
    checkpoint = grounding_checkpoint(ldm.unet, str(pretrained), **hparams)
    checkpoint["gligen"]["source"] = f"GLIGENModule checkpoint exported from {module.hparams.pretrained}"
    torch.save(checkpoint, out_dir / "gligen.ckpt")
    return out_dir


def _plain_unet(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """The frozen base UNet without fusers / position_net (shares the tensors)."""
    config = {k: v for k, v in unet.config.items() if k != "attention_type"}
    plain = UNet2DConditionModel.from_config(config)
    plain.load_state_dict(
        {k: v for k, v in unet.state_dict().items() if ".fuser." not in k and not k.startswith("position_net.")},
        assign=True,
    )
    return plain


def _diffusers_class(name: str):
    if not hasattr(diffusers, name):
        raise InteropError(f"scheduler class {name!r} of the base pipeline is not in diffusers")
    return getattr(diffusers, name)


def grounding_checkpoint(unet: UNet2DConditionModel, pretrained: str, **hparams) -> dict:
    """A Lightning-style checkpoint as `GLIGENModule.on_save_checkpoint` writes it: trainable keys only
    (`ldm.unet.<block>.fuser.*`, `ldm.unet.position_net.*`), all constructor hyper-parameters, the `gligen` entry."""
    signature = inspect.signature(GLIGENModule.__init__)
    defaults = {n: p.default for n, p in signature.parameters.items() if p.default is not inspect.Parameter.empty}
    hyper_parameters = {**defaults, **hparams, "pretrained": pretrained}
    trainable = {name for name, _ in fusers(unet)}
    state_dict = {
        f"ldm.unet.{k}": v.detach().clone()
        for k, v in unet.state_dict().items()
        if k.startswith("position_net.") or any(k.startswith(f"{block}.fuser.") for block in trainable)
    }
    return {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": lightning.__version__,
        "state_dict": state_dict,
        "hyper_parameters": hyper_parameters,
        "gligen": {"format": CHECKPOINT_FORMAT, "pretrained": pretrained, "source": "official GLIGEN checkpoint"},
    }
