"""Official GLIGEN `.pth` (box, text_image or keypoint variant) -> a diffusers SD directory (the frozen LDM) plus a
GLIGENModule checkpoint of the variant's modality. Key renaming is diffusers' own `single_file_utils`."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    LDM_UNET_KEY,
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from transformers import CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from gligen.constants import CLIP_SUBFOLDER
from gligen.interop.export import _diffusers_class, _plain_unet, grounding_checkpoint
from gligen.interop.safe_load import InteropError, _listing, load_official
from gligen.ldm import ldm_clip_dir, save_ldm
from gligen.modalities import get_modality, modality_names
from gligen.nn.grounded_unet import add_grounding

log = logging.getLogger(__name__)


class _Consumed:
    """Tracks which source tensors ended up in a converted state dict.

    diffusers' converters silently skip keys they do not know and never report leftovers, so consumption is
    checked by storage: a converted tensor is the source tensor or a view of it (conv 1x1 -> linear slicing).
    Source tensors that share memory (tied weights) count as one."""

    def __init__(self, source: dict[str, torch.Tensor]):
        self.source = source
        self.used: set[str] = set()

    def mark(self, converted: dict[str, torch.Tensor]) -> None:
        pointers = {t.data_ptr() for t in converted.values() if isinstance(t, torch.Tensor)}
        self.used |= {k for k, t in self.source.items() if t.data_ptr() in pointers}

    def leftover(self) -> set[str]:
        return set(self.source) - self.used


def _load_strict(model: torch.nn.Module, state_dict: dict, what: str, consumed: _Consumed) -> None:
    """Fill every parameter of `model`; any missing / unexpected / wrong-shape key is an error that lists them."""
    expected = model.state_dict()
    missing = set(expected) - set(state_dict)
    unexpected = set(state_dict) - set(expected)
    shapes = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing from the file: {_listing(missing)}")
        if unexpected:
            parts.append(f"not in the model (after renaming to diffusers names): {_listing(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches (is --base the right architecture?): {_listing(shapes, 10)}")
        raise InteropError(f"{what}: the official weights do not fit the base architecture; " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)
    consumed.mark(state_dict)


def _check_leftovers(part: str, consumed: _Consumed) -> None:
    leftover = consumed.leftover()
    if leftover:
        raise InteropError(f"official '{part}': {len(leftover)} keys were not converted: {_listing(leftover)}")


# ----- variants: which official position_net, which of our modalities ----------------------------------------------
def official_tokenizer_modules() -> dict[str, str]:
    """official grounding_tokenizer module (config_dict model.params.grounding_tokenizer.target) -> our modality"""
    return {get_modality(m).official_tokenizer: m for m in modality_names() if get_modality(m).official_tokenizer}


def position_net_markers() -> dict[str, str]:
    """modality -> a key only that official variant's position_net has (the strict load checks the full set)"""
    return {m: get_modality(m).official_marker for m in modality_names() if get_modality(m).official_marker}


def official_config_variant(config) -> tuple[str | None, str]:
    """(modality or None, what the config says) from a plain `config_dict` (see `load_official`)."""
    if not isinstance(config, dict) or not config:
        return None, "the file has no readable config_dict"
    try:
        target = config["model"]["params"]["grounding_tokenizer"]["target"]
    except (KeyError, TypeError):
        return None, "config_dict has no model.params.grounding_tokenizer.target"
    if not isinstance(target, str):
        return None, f"config_dict's grounding_tokenizer target is {target!r}"
    module = target.rsplit(".", 2)[-2] if target.count(".") >= 1 else target
    if module not in official_tokenizer_modules():
        raise InteropError(
            f"official config_dict names grounding tokenizer {target!r}; supported: "
            f"{', '.join(f'{m} ({v})' for m, v in official_tokenizer_modules().items())} (spatial-map variants such "
            "as depth / canny / semantic need a ConvNeXt tokenizer and extra input channels this project lacks)"
        )
    return official_tokenizer_modules()[module], f"config_dict names {target}"


def official_variant(model_sd: dict, config=None) -> tuple[str, str]:
    """The modality of an official `model` state dict: decided by its position_net keys, cross-checked with the
    config when it is readable. Returns (modality, a note on the config)."""
    position = sorted(k for k in model_sd if k.startswith("position_net."))
    if not position:
        raise InteropError(
            "official 'model': expected GLIGEN layers (`...transformer_blocks.N.fuser.*` and `position_net.*`), "
            f"found {sum('.fuser.' in k for k in model_sd)} fuser keys and 0 position_net keys"
        )
    found = [v for v, marker in position_net_markers().items() if marker in model_sd]
    if len(found) != 1:
        raise InteropError(
            "official 'model': cannot tell the position_net variant (box: null_positive_feature; text_image: "
            f"linears_text / null_text_feature; keypoint: person_embeddings); found {_listing(position)}"
        )
    variant = found[0]
    from_config, note = official_config_variant(config)
    if from_config is not None and from_config != variant:
        raise InteropError(
            f"official checkpoint is inconsistent: {note} ({from_config}) but the position_net keys are those of "
            f"the {variant} variant ({_listing(position, 8)})"
        )
    return variant, note


def official_position_net(model_sd: dict, variant: str, unet_config: dict, text_width: int):
    """Our tokenizer for the official position_net, sized from its tensors, plus the GLIGENModule hyper-parameters
    that rebuild it (`Modality.official_position_net`). Sizes the module cannot rebuild are an error here."""
    width = unet_config["cross_attention_dim"]

    def shape(name):
        key = f"position_net.{name}"
        if key not in model_sd:
            raise InteropError(f"official 'model': {variant} position_net without {key}")
        return tuple(model_sd[key].shape)

    try:
        return get_modality(variant).official_position_net(shape, width, text_width)
    except ValueError as error:
        if isinstance(error, InteropError):
            raise
        raise InteropError(str(error)) from None


def convert_official_unet(
    model_sd: dict, unet_config: dict, position_net: torch.nn.Module | None = None
) -> UNet2DConditionModel:
    """Official `model` -> the grounded diffusers UNet (base weights + fusers + position_net), every key consumed.

    `position_net`: our tokenizer for the file's variant (`official_position_net`); default the text+box one."""
    consumed = _Consumed(model_sd)
    position = {k: v for k, v in model_sd.items() if k.startswith("position_net.")}
    fuser_keys = [k for k in model_sd if ".fuser." in k]
    if not fuser_keys or not position:
        raise InteropError(
            "official 'model': expected GLIGEN layers (`...transformer_blocks.N.fuser.*` and `position_net.*`), "
            f"found {len(fuser_keys)} fuser keys and {len(position)} position_net keys"
        )
    if not any(".fuser.linear." in k for k in fuser_keys):
        raise InteropError(
            "official 'model': the fusers have no `linear` (gated cross-attention, fuser_type gatedCA); "
            "only gated self-attention (gatedSA) is supported"
        )
    if position_net is None and not {"position_net.linears.0.weight", "position_net.null_positive_feature"} <= set(
        position
    ):
        raise InteropError(
            "official 'model': position_net is not the text+box PositionNet (expected `position_net.linears.*`, "
            f"`null_positive_feature`, `null_position_feature`); found {_listing(position)}"
        )
    # diffusers' converter expects the LDM prefix it strips; fuser keys are renamed with their block (see module doc)
    prefixed = {LDM_UNET_KEY + k: v for k, v in model_sd.items() if not k.startswith("position_net.")}
    converted = convert_ldm_unet_checkpoint(prefixed, dict(unet_config))
    converted.update(position)  # same names in official code, diffusers and ours

    unet = UNet2DConditionModel.from_config(unet_config)
    add_grounding(unet, position_net)  # gated SA fusers, like the official models; position net of the variant
    _load_strict(unet, converted, "official 'model' (UNet)", consumed)
    # `prefixed` is a new dict over the same tensors, so consumption of the original keys is tracked by storage
    _check_leftovers("model", consumed)
    return unet


def convert_official_vae(autoencoder_sd: dict, vae_config: dict) -> AutoencoderKL:
    consumed = _Consumed(autoencoder_sd)
    converted = convert_ldm_vae_checkpoint(autoencoder_sd, dict(vae_config))
    vae = AutoencoderKL.from_config(vae_config)
    _load_strict(vae, converted, "official 'autoencoder' (VAE)", consumed)
    _check_leftovers("autoencoder", consumed)
    return vae


def convert_official_text_encoder(text_sd: dict, text_config: CLIPTextConfig) -> CLIPTextModel:
    """Official FrozenCLIPEmbedder keys are `transformer.text_model.*` around a HF CLIPTextModel."""
    consumed = _Consumed(text_sd)
    converted = convert_ldm_clip_checkpoint(text_sd, remove_prefix="transformer.")
    text_encoder = CLIPTextModel(text_config)
    # older transformers saved the position id buffer (0..76); newer ones keep it out of the state dict. It holds
    # no learned value: check it is the arange it must be, then count it as consumed.
    ids_key = "text_model.embeddings.position_ids"
    if ids_key in converted and ids_key not in text_encoder.state_dict():
        ids = converted.pop(ids_key)
        if not torch.equal(ids.flatten().long(), torch.arange(ids.numel())):
            raise InteropError("official 'text_encoder': position_ids is not 0..N-1")
        consumed.used.add("transformer." + ids_key)
    _load_strict(text_encoder, converted, "official 'text_encoder' (CLIP)", consumed)
    _check_leftovers("text_encoder", consumed)
    return text_encoder


def ldm_schedule_buffers(betas: torch.Tensor) -> dict[str, torch.Tensor]:
    """The buffers LDM's `register_schedule` derives from betas (v_posterior = 0), in float64."""
    betas = betas.double()
    alphas = 1 - betas
    cumprod = torch.cumprod(alphas, 0)
    prev = torch.cat([cumprod.new_ones(1), cumprod[:-1]])
    posterior_variance = betas * (1 - prev) / (1 - cumprod)
    return {
        "betas": betas,
        "alphas_cumprod": cumprod,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1 / cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / cumprod - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * prev.sqrt() / (1 - cumprod),
        "posterior_mean_coef2": (1 - prev) * alphas.sqrt() / (1 - cumprod),
    }


def check_official_schedule(diffusion_sd: dict, scheduler_config: dict) -> None:
    """The official `diffusion` buffers must be the schedule the written scheduler will use (SD-1.x: scaled-linear
    0.00085..0.012, 1000 steps). Every buffer is recomputed from the scheduler's betas and compared."""
    if scheduler_config.get("prediction_type", "epsilon") != "epsilon":
        raise InteropError(
            f"the base scheduler predicts {scheduler_config['prediction_type']!r}; GLIGEN (SD-1.x) predicts 'epsilon'"
        )
    betas = DDPMScheduler.from_config(scheduler_config).betas
    expected = ldm_schedule_buffers(betas)
    unknown = set(diffusion_sd) - set(expected)
    if unknown:
        raise InteropError(f"official 'diffusion': unknown buffers {_listing(unknown)}; expected {sorted(expected)}")
    if "betas" not in diffusion_sd:
        raise InteropError(f"official 'diffusion': no 'betas' buffer; found {sorted(diffusion_sd)}")
    for name, value in diffusion_sd.items():
        want = expected[name]
        # LDM computes in float64 and stores float32; diffusers computes betas in float32: rtol 1e-4 covers both
        if value.shape != want.shape or not torch.allclose(value.double(), want, rtol=1e-4, atol=1e-7):
            raise InteropError(
                f"official 'diffusion' buffer {name!r} does not match the base scheduler "
                f"({scheduler_config.get('beta_schedule')} {scheduler_config.get('beta_start')}.."
                f"{scheduler_config.get('beta_end')}, {scheduler_config.get('num_train_timesteps')} steps): file "
                f"shape {tuple(value.shape)} first/last {value.flatten()[[0, -1]].tolist() if value.numel() else []}, "
                f"expected first/last {want[[0, -1]].tolist()}"
            )


def import_official(
    checkpoint: str | Path,
    out_dir: str | Path,
    base: str = "CompVis/stable-diffusion-v1-4",
    clip: str | None = None,
) -> tuple[Path, Path]:
    """Convert an official GLIGEN checkpoint of the box, text_image or keypoint variant (told by its position_net
    keys, cross-checked with its config_dict when readable). Writes `out_dir/pretrained/` (diffusers SD layout: the
    official base UNet, VAE and text encoder; tokenizer and scheduler from `base`) and `out_dir/gligen.ckpt` (fusers
    and position_net, with the variant's `modality`, loadable with `GLIGENModule.from_checkpoint`). Returns
    (pretrained dir, checkpoint path); the checkpoint's `gligen["official"]` records the variant and the config note.

    Text+image models need a CLIP image tower for image entities, which the official file does not hold (official
    inference loads openai/clip-vit-large-patch14 separately): `clip` (a transformers CLIPModel directory or hub id;
    default `<base>/clip` when `base` is a local directory that has one) is copied to `pretrained/clip`, where
    `FrozenLDM` finds it. Without one the import still succeeds, and a warning says how to add it."""
    official = load_official(checkpoint)
    # only configs, tokenizer and scheduler are read from `base`: no base weight is loaded
    unet_config = UNet2DConditionModel.load_config(base, subfolder="unet")
    unet_config.pop("attention_type", None)  # a GLIGEN base would come with fusers; add_grounding puts them back
    vae_config = AutoencoderKL.load_config(base, subfolder="vae")
    text_config = CLIPTextConfig.from_pretrained(base, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    scheduler_config = dict(DDPMScheduler.load_config(base, subfolder="scheduler"))
    scheduler = _diffusers_class(scheduler_config["_class_name"]).from_config(scheduler_config)

    check_official_schedule(official["diffusion"], scheduler_config)
    conv_in = official["model"].get("input_blocks.0.0.weight")
    if conv_in is not None and conv_in.ndim == 4 and conv_in.shape[1] != unet_config["in_channels"]:
        raise InteropError(
            f"official 'model' takes {conv_in.shape[1]} input channels (inpainting GLIGEN has 9), the base UNet "
            f"{unet_config['in_channels']}; only the generation (4-channel) model is supported"
        )
    variant, config_note = official_variant(official["model"], official.get("config_dict"))
    position_net, hparams = official_position_net(official["model"], variant, unet_config, text_config.hidden_size)
    unet = convert_official_unet(official["model"], unet_config, position_net)
    vae = convert_official_vae(official["autoencoder"], vae_config)
    text_encoder = convert_official_text_encoder(official["text_encoder"], text_config)

    out_dir = Path(out_dir)
    pretrained = (out_dir / "pretrained").resolve()
    save_ldm(pretrained, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=_plain_unet(unet),
             scheduler=scheduler)
    clip_note = None
    if get_modality(variant).entity_images:
        clip_note = _copy_clip(clip, base, pretrained, text_encoder)
    ckpt_path = out_dir / "gligen.ckpt"
    grounding = grounding_checkpoint(unet, str(pretrained), **hparams)
    grounding["gligen"]["official"] = {"variant": variant, "modality": hparams["modality"],
                                       "config": config_note, "clip": clip_note}
    torch.save(grounding, ckpt_path)
    return pretrained, ckpt_path


def _copy_clip(clip: str | None, base: str, pretrained: Path, text_encoder: CLIPTextModel) -> str | None:
    """Copy the CLIP used for image entities into `pretrained/clip`; returns where it came from (None: none)."""
    clip = clip if clip is not None else ldm_clip_dir(base)
    if clip is None:
        log.warning(
            "text_image import: no CLIP image tower (--clip); image entities need one. Copy a transformers CLIPModel "
            "whose text tower is this text encoder (SD-1.x: openai/clip-vit-large-patch14) to %s/%s", pretrained,
            CLIP_SUBFOLDER)
        return None
    model = CLIPModel.from_pretrained(clip)
    if model.config.text_config.hidden_size != text_encoder.config.hidden_size:
        raise InteropError(
            f"CLIP {clip}: text width {model.config.text_config.hidden_size}, the official text encoder's is "
            f"{text_encoder.config.hidden_size}: it is not the CLIP of this model"
        )
    model.save_pretrained(pretrained / CLIP_SUBFOLDER)
    try:
        CLIPImageProcessor.from_pretrained(clip).save_pretrained(pretrained / CLIP_SUBFOLDER)
    except OSError:  # no preprocessor_config.json: FrozenLDM falls back to CLIP's defaults
        pass
    return clip
