"""Interoperability: export a trained GLIGENModule to diffusers, import an official GLIGEN checkpoint.

Two directions, both built on diffusers' own code rather than hand-written key tables:

* `export_to_diffusers`: GLIGENModule checkpoint -> a `StableDiffusionGLIGENPipeline` directory. Our grounded UNet
  already has the exact state dict of `UNet2DConditionModel(attention_type="gated")` (see `add_grounding`), so the
  export is "rebuild the module, wrap it in diffusers' pipeline, save".
* `import_official`: official GLIGEN `.pth` (dict with `model`, `autoencoder`, `text_encoder`, `diffusion`,
  `config_dict`) -> a diffusers SD directory (the frozen LDM, our `pretrained`) plus a GLIGENModule checkpoint holding
  the fusers and position_net. The LDM -> diffusers key renaming is diffusers' `single_file_utils` converters; fuser
  keys ride along because the UNet converter renames attention blocks by prefix (`input_blocks.1.1` ->
  `down_blocks.0.attentions.0`), which carries `...transformer_blocks.0.fuser.*` exactly like `attn1`.

The official file holds no tokenizer and no component configs (its `config_dict` names LDM classes, and is an
OmegaConf object that cannot be read without unpickling), so the architecture, tokenizer and scheduler come from a
`base` diffusers SD-1.x directory or hub id. Every weight still comes from the official file: each source tensor must
land in a model and each model parameter must be filled, or the import fails listing the keys.
"""

import inspect
import json
import pickle
from pathlib import Path

import diffusers
import lightning
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    LDM_UNET_KEY,
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .ldm import save_ldm
from .module import CHECKPOINT_FORMAT, GLIGENModule
from .nn.grounded_unet import add_grounding, fusers
from .nn.tokenizers import TextBoxTokenizer

try:  # moved to `deprecated` in recent diffusers; the top-level name is kept as an alias while it lasts
    from diffusers import StableDiffusionGLIGENPipeline
except ImportError:  # pragma: no cover - depends on the installed diffusers
    from diffusers.pipelines.deprecated.stable_diffusion_gligen import StableDiffusionGLIGENPipeline


class InteropError(ValueError):
    """A checkpoint or model that cannot be converted; the message says what was expected and what was found."""


def _listing(keys, limit: int = 20) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


# =====================================================================================================================
# Export: GLIGENModule checkpoint -> diffusers StableDiffusionGLIGENPipeline directory
# =====================================================================================================================

def check_exportable(module: GLIGENModule) -> None:
    """diffusers' GLIGEN UNet has one fixed design: gated self-attention fusers and the text+box position net with
    8 Fourier frequencies and phrase width = token width. Anything else would load with wrong or missing weights."""
    hp = module.hparams
    problems = []
    if hp.modality != "box":
        problems.append(f"modality is {hp.modality!r}, diffusers' StableDiffusionGLIGENPipeline needs 'box'")
    if hp.fuser_type != "gated_self_attention":
        problems.append(
            f"fuser_type is {hp.fuser_type!r}, diffusers' GatedSelfAttentionDense is 'gated_self_attention'"
        )
    position_net = module.ldm.unet.position_net
    width = module.ldm.unet.config.cross_attention_dim
    if not isinstance(position_net, TextBoxTokenizer):
        problems.append(f"position_net is {type(position_net).__name__}, diffusers needs the text+box tokenizer")
    elif (position_net.fourier_freqs, position_net.positive_len) != (8, width):
        problems.append(
            f"position_net has {position_net.fourier_freqs} Fourier frequencies and phrase width "
            f"{position_net.positive_len}; diffusers fixes 8 and the cross-attention width {width}"
        )
    if problems:
        raise InteropError("cannot export to diffusers: " + "; ".join(problems))


def export_to_diffusers(checkpoint: str | Path, out_dir: str | Path, pretrained: str | None = None) -> Path:
    """Write a directory that `StableDiffusionGLIGENPipeline.from_pretrained(out_dir)` loads as is.

    The UNet is the grounded UNet (config `attention_type="gated"`, so diffusers rebuilds its fusers and position
    net and fills them from our weights); VAE, text encoder, tokenizer and scheduler are those of `pretrained`
    (default: the one recorded in the checkpoint). No safety checker is written (the frozen LDM has none either).
    """
    module = GLIGENModule.from_checkpoint(str(checkpoint), pretrained)
    check_exportable(module)
    ldm = module.ldm
    # the sampling scheduler of the base pipeline (PNDM for SD-1.x, DDIM for the toy), not the training DDPM
    scheduler_class = _diffusers_class(ldm.scheduler_config["_class_name"])
    scheduler = scheduler_class.from_config(ldm.scheduler_config)
    pipeline = StableDiffusionGLIGENPipeline(
        vae=ldm.vae,
        text_encoder=ldm.text_encoder,
        tokenizer=ldm.tokenizer,
        unet=ldm.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out_dir = Path(out_dir)
    pipeline.save_pretrained(out_dir)
    # `add_grounding` records attention_type in the config; without it diffusers would drop every fuser weight
    unet_config = json.loads((out_dir / "unet" / "config.json").read_text())
    if unet_config.get("attention_type") != "gated":
        raise InteropError(f"{out_dir}/unet/config.json has attention_type {unet_config.get('attention_type')!r}")
    return out_dir


def _diffusers_class(name: str):
    if not hasattr(diffusers, name):
        raise InteropError(f"scheduler class {name!r} of the base pipeline is not in diffusers")
    return getattr(diffusers, name)


# =====================================================================================================================
# Import: official GLIGEN checkpoint -> diffusers SD directory + GLIGENModule checkpoint
# =====================================================================================================================

OFFICIAL_WEIGHT_PARTS = ("model", "autoencoder", "text_encoder", "diffusion")
OFFICIAL_PARTS = (*OFFICIAL_WEIGHT_PARTS, "config_dict")

UNSAFE_FILE_HELP = """\
torch.load(..., weights_only=True) refused the file: it contains pickled Python objects, not only tensors.
Official GLIGEN checkpoints store `config_dict` as OmegaConf objects. This converter never unpickles arbitrary
objects (unpickling can run code), and it does not need config_dict (the architecture comes from --base).
Safe workaround: strip config_dict once, still loading with weights_only=True, by allow-listing only the classes
torch names (OmegaConf's DictConfig, ListConfig, ContainerMetadata, Metadata, AnyNode, typing.Any, ...; rerun and
add the next one torch names until it loads):
    torch.serialization.add_safe_globals([omegaconf.DictConfig, ...])
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt["config_dict"] = None
    torch.save(ckpt, stripped_path)        # then: python -m gligen.convert from-official stripped_path ...
Loading with weights_only=False instead runs whatever the file contains: only for a file you trust, in a
throwaway container.
torch said: """


def load_official(path: str | Path) -> dict:
    """Read an official GLIGEN checkpoint without unpickling code, and check its layout."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # keep torch's one useful line: which global (class) it refused
        detail = [line.strip() for line in str(error).splitlines() if "Unsupported global" in line] or [str(error)]
        raise InteropError(f"{path}: {UNSAFE_FILE_HELP}{detail[0]}") from None
    return check_official_layout(checkpoint, str(path))


def check_official_layout(checkpoint, name: str = "checkpoint") -> dict:
    if not isinstance(checkpoint, dict):
        raise InteropError(
            f"{name}: expected an official GLIGEN checkpoint (a dict with {list(OFFICIAL_PARTS)}), "
            f"found a {type(checkpoint).__name__}"
        )
    missing = [k for k in OFFICIAL_WEIGHT_PARTS if k not in checkpoint]
    if missing:
        hint = ""
        if "state_dict" in checkpoint and "hyper_parameters" in checkpoint:
            hint = " (this looks like a Lightning / GLIGENModule checkpoint: it needs no import)"
        elif "state_dict" in checkpoint:
            hint = " (this looks like a plain Stable Diffusion checkpoint without GLIGEN layers)"
        raise InteropError(
            f"{name}: expected an official GLIGEN checkpoint with keys {list(OFFICIAL_PARTS)}; found keys "
            f"{sorted(map(str, checkpoint))}, missing {missing}{hint}"
        )
    for part in OFFICIAL_WEIGHT_PARTS:
        value = checkpoint[part]
        if not isinstance(value, dict) or not all(isinstance(v, torch.Tensor) for v in value.values()):
            raise InteropError(
                f"{name}: '{part}' should be a state dict (name -> tensor), found {type(value).__name__}"
            )
    # released files have exactly these parts; training snapshots (opt, scheduler, iters, ema) are not converted
    extra = sorted(set(map(str, checkpoint)) - set(OFFICIAL_PARTS))
    if extra:
        raise InteropError(f"{name}: unexpected top-level keys {extra}; expected only {list(OFFICIAL_PARTS)}")
    return checkpoint


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


def convert_official_unet(model_sd: dict, unet_config: dict) -> UNet2DConditionModel:
    """Official `model` -> the grounded diffusers UNet (base weights + fusers + position_net), every key consumed."""
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
    if not {"position_net.linears.0.weight", "position_net.null_positive_feature"} <= set(position):
        raise InteropError(
            "official 'model': position_net is not the text+box PositionNet (expected `position_net.linears.*`, "
            f"`null_positive_feature`, `null_position_feature`); found {_listing(position)}"
        )
    # diffusers' converter expects the LDM prefix it strips; fuser keys are renamed with their block (see module doc)
    prefixed = {LDM_UNET_KEY + k: v for k, v in model_sd.items() if not k.startswith("position_net.")}
    converted = convert_ldm_unet_checkpoint(prefixed, dict(unet_config))
    converted.update(position)  # same names in official code, diffusers and ours

    unet = UNet2DConditionModel.from_config(unet_config)
    add_grounding(unet)  # default fuser (gated SA) and text+box tokenizer, like the official box model
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


def import_official(
    checkpoint: str | Path, out_dir: str | Path, base: str = "CompVis/stable-diffusion-v1-4"
) -> tuple[Path, Path]:
    """Convert an official GLIGEN box checkpoint. Writes `out_dir/pretrained/` (diffusers SD layout: the official
    base UNet, VAE and text encoder; tokenizer and scheduler from `base`) and `out_dir/gligen.ckpt` (fusers and
    position_net, loadable with `GLIGENModule.from_checkpoint`). Returns (pretrained dir, checkpoint path)."""
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
    unet = convert_official_unet(official["model"], unet_config)
    vae = convert_official_vae(official["autoencoder"], vae_config)
    text_encoder = convert_official_text_encoder(official["text_encoder"], text_config)

    out_dir = Path(out_dir)
    pretrained = (out_dir / "pretrained").resolve()
    plain_unet = UNet2DConditionModel.from_config(unet_config)
    plain_unet.load_state_dict(  # the frozen LDM is the plain UNet; assign shares the tensors instead of copying
        {k: v for k, v in unet.state_dict().items() if ".fuser." not in k and not k.startswith("position_net.")},
        assign=True,
    )
    save_ldm(pretrained, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=plain_unet, scheduler=scheduler)
    ckpt_path = out_dir / "gligen.ckpt"
    torch.save(grounding_checkpoint(unet, str(pretrained)), ckpt_path)
    return pretrained, ckpt_path
