"""Interoperability: export a trained GLIGENModule to diffusers, import an official GLIGEN checkpoint.

Two directions, both built on diffusers' own code rather than hand-written key tables:

* `export_to_diffusers`: GLIGENModule checkpoint -> a diffusers pipeline directory. Our grounded UNet already has the
  exact state dict of `UNet2DConditionModel(attention_type="gated" | "gated-text-image")` (see `add_grounding`), so
  the export is "rebuild the module, wrap it in diffusers' pipeline, save". Box models give a
  `StableDiffusionGLIGENPipeline`; text+image (and image) models a `StableDiffusionGLIGENTextImagePipeline`, whose
  image tower and image projection are cut from the LDM's CLIP (`<pretrained>/clip`). diffusers has no keypoint
  pipeline: keypoint models are written in this project's own format (`pretrained/` + `gligen.ckpt`).
* `import_official`: official GLIGEN `.pth` (dict with `model`, `autoencoder`, `text_encoder`, `diffusion`,
  `config_dict`) of the box, text+image or keypoint variant -> a diffusers SD directory (the frozen LDM, our
  `pretrained`) plus a GLIGENModule checkpoint holding the fusers and position_net, with the matching `modality`.
  The LDM -> diffusers key renaming is diffusers' `single_file_utils` converters; fuser keys ride along because the
  UNet converter renames attention blocks by prefix (`input_blocks.1.1` -> `down_blocks.0.attentions.0`), which
  carries `...transformer_blocks.0.fuser.*` exactly like `attn1`. position_net keys are the same in the official
  code, diffusers and here.

The official file holds no tokenizer and no component configs, so the architecture, tokenizer and scheduler come
from a `base` diffusers SD-1.x directory or hub id. Its `config_dict` is `vars()` of an OmegaConf DictConfig (a plain
dict around pickled OmegaConf objects); it is read with `torch.load(weights_only=True)` and inert stand-ins for the
OmegaConf classes (`load_official`), never by unpickling OmegaConf itself, and only serves to cross-check the variant
that the position_net keys determine. Every weight still comes from the official file: each source tensor must
land in a model and each model parameter must be filled, or the import fails listing the keys.
"""

import inspect
import json
import logging
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
from transformers import (
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from .ldm import save_ldm
from .module import CHECKPOINT_FORMAT, GLIGENModule
from .nn.grounded_unet import add_grounding, fusers
from .nn.tokenizers import NUM_KEYPOINTS, KeypointTokenizer, TextBoxTokenizer, TextImageBoxTokenizer

try:  # moved to `deprecated` in recent diffusers; the top-level name is kept as an alias while it lasts
    from diffusers import StableDiffusionGLIGENPipeline
except ImportError:  # pragma: no cover - depends on the installed diffusers
    from diffusers.pipelines.deprecated.stable_diffusion_gligen import StableDiffusionGLIGENPipeline
try:
    from diffusers import StableDiffusionGLIGENTextImagePipeline
except ImportError:  # pragma: no cover - depends on the installed diffusers
    from diffusers.pipelines.deprecated.stable_diffusion_gligen import StableDiffusionGLIGENTextImagePipeline
from diffusers.pipelines.stable_diffusion.clip_image_project_model import CLIPImageProjection

log = logging.getLogger(__name__)


class InteropError(ValueError):
    """A checkpoint or model that cannot be converted; the message says what was expected and what was found."""


def _listing(keys, limit: int = 20) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


# =====================================================================================================================
# Export: GLIGENModule checkpoint -> diffusers StableDiffusionGLIGENPipeline directory
# =====================================================================================================================

# modality -> the diffusers pipeline that runs it and the UNet attention_type it needs (keypoint: none exists)
DIFFUSERS_TARGETS = {
    "box": ("StableDiffusionGLIGENPipeline", "gated"),
    "text_image": ("StableDiffusionGLIGENTextImagePipeline", "gated-text-image"),
    "image": ("StableDiffusionGLIGENTextImagePipeline", "gated-text-image"),
}


def check_exportable(module: GLIGENModule) -> None:
    """diffusers' GLIGEN UNets have one fixed design: gated self-attention fusers and a position net with 8 Fourier
    frequencies whose entity width is the token width (text+box, or text+image+box for `gated-text-image`).
    Anything else would load with wrong or missing weights."""
    hp = module.hparams
    problems = []
    if hp.modality not in DIFFUSERS_TARGETS:
        problems.append(
            f"modality is {hp.modality!r}; diffusers has GLIGEN pipelines for {sorted(DIFFUSERS_TARGETS)} only "
            "(keypoint models are written in this project's format instead, see `export_keypoint`)"
        )
    if hp.fuser_type != "gated_self_attention":
        problems.append(
            f"fuser_type is {hp.fuser_type!r}, diffusers' GatedSelfAttentionDense is 'gated_self_attention'"
        )
    position_net = module.ldm.unet.position_net
    width = module.ldm.unet.config.cross_attention_dim
    if hp.modality == "box":
        if not isinstance(position_net, TextBoxTokenizer):
            problems.append(f"position_net is {type(position_net).__name__}, diffusers needs the text+box tokenizer")
        elif (position_net.fourier_freqs, position_net.positive_len) != (8, width):
            problems.append(
                f"position_net has {position_net.fourier_freqs} Fourier frequencies and phrase width "
                f"{position_net.positive_len}; diffusers fixes 8 and the cross-attention width {width}"
            )
    elif hp.modality in DIFFUSERS_TARGETS:
        if not isinstance(position_net, TextImageBoxTokenizer):
            problems.append(f"position_net is {type(position_net).__name__}, diffusers needs text+image+box")
        elif (position_net.fourier_freqs, position_net.in_dim) != (8, width):
            problems.append(
                f"position_net has {position_net.fourier_freqs} Fourier frequencies and entity width "
                f"{position_net.in_dim}; diffusers fixes 8 and the cross-attention width {width}"
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
    if module.hparams.modality == "keypoint":
        return export_keypoint(module, out_dir)
    check_exportable(module)
    ldm = module.ldm
    pipeline_name, attention_type = DIFFUSERS_TARGETS[module.hparams.modality]
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
        from .ldm import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD

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
    `gligen.sampling.sample` or `python -m gligen.sample --ckpt out_dir/gligen.ckpt`."""
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


# =====================================================================================================================
# Import: official GLIGEN checkpoint -> diffusers SD directory + GLIGENModule checkpoint
# =====================================================================================================================

OFFICIAL_WEIGHT_PARTS = ("model", "autoencoder", "text_encoder", "diffusion")
OFFICIAL_PARTS = (*OFFICIAL_WEIGHT_PARTS, "config_dict")

# ----- reading official files without unpickling code ---------------------------------------------------------
# The official trainer saves `config_dict = vars(config)` for an OmegaConf DictConfig `config`: a plain dict
# {"_metadata": ContainerMetadata, "_parent": None, "_content": {name: DictConfig | ListConfig | AnyNode, ...}}
# (official inference reads `saved_ckpt["config_dict"]["_content"]`). OmegaConf objects pickle as NEWOBJ (empty
# instance of the class) + BUILD (their `__dict__` / `__getstate__()` dict). torch's weights_only unpickler runs
# NEWOBJ / BUILD only for allow-listed classes and then calls `__setstate__`, so allow-listing the OmegaConf *names*
# mapped to the inert classes below rebuilds the config as data: no OmegaConf code runs, omegaconf is never
# imported, and every other global is still refused by torch.


class _OmegaConfObject:
    """Inert stand-in for an OmegaConf class in a pickle: keeps the pickled state dict, runs nothing."""

    def __init__(self):  # never called by the unpickler (NEWOBJ uses __new__), here for completeness
        self.state = {}

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state), as pickle's BUILD allows
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected pickled state {type(state).__name__} of {self.omegaconf_name}")
        self.state = state

    def __repr__(self):
        return f"<{self.omegaconf_name} stand-in>"


class _DictConfig(_OmegaConfObject):
    omegaconf_name = "omegaconf.dictconfig.DictConfig"


class _ListConfig(_OmegaConfObject):
    omegaconf_name = "omegaconf.listconfig.ListConfig"


class _ValueNode(_OmegaConfObject):
    omegaconf_name = "omegaconf.nodes.ValueNode"


class _Metadata(_OmegaConfObject):
    omegaconf_name = "omegaconf.base.Metadata"


class _Marker:
    """A global that only appears as a value (OmegaConf metadata's `ref_type=typing.Any`, `object_type=dict`,
    `key_type=int`); not a class, and calling it (REDUCE) refuses the file, so nothing is constructed with it."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args, **kwargs):
        raise pickle.UnpicklingError(f"the file calls {self.name}: allowed only as a value in OmegaConf metadata")

    def __repr__(self):
        return self.name


def _defaultdict_as_dict(default_factory=None):
    """OmegaConf 2.0 metadata holds `resolver_cache = defaultdict(dict)`: rebuilt as a plain dict."""
    return {}


_NODE_CLASSES = ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "BytesNode")
OMEGACONF_STAND_INS = [
    (_DictConfig, "omegaconf.dictconfig.DictConfig"),
    (_ListConfig, "omegaconf.listconfig.ListConfig"),
    (_Metadata, "omegaconf.base.Metadata"),
    (_Metadata, "omegaconf.base.ContainerMetadata"),
    *[(_ValueNode, f"omegaconf.nodes.{name}") for name in _NODE_CLASSES],
    (_Marker("typing.Any"), "typing.Any"),
    # metadata types: object_type dict / list, key_type int (ListConfig) or str, typed value nodes' ref_type
    *[(_Marker(f"builtins.{name}"), f"builtins.{name}") for name in ("dict", "list", "int", "str", "float", "bool")],
    (_defaultdict_as_dict, "collections.defaultdict"),
]

UNSAFE_FILE_HELP = """\
torch.load(..., weights_only=True) refused the file: it contains a pickled Python object other than tensors and
the OmegaConf config containers official GLIGEN checkpoints hold (OmegaConf's DictConfig, ListConfig, value nodes
and metadata are read through inert stand-ins). This converter never unpickles arbitrary objects (unpickling can
run code). If the file is an official GLIGEN checkpoint you trust, strip the offending entry in a throwaway
container: load it there with pickling allowed (torch's weights_only=False runs whatever the file contains), set
the offending entry (e.g. "config_dict") to None, torch.save it, then run from-official on the stripped file.
torch said: """


def _plain_config(value):
    """OmegaConf stand-ins -> plain dicts / lists / values. `_parent` back-references are dropped (no cycles)."""
    if isinstance(value, _DictConfig):
        content = value.state.get("_content")
        return _plain_config(content)  # None, "???" (missing) or an interpolation string stay as they are
    if isinstance(value, _ListConfig):
        return _plain_config(value.state.get("_content"))
    if isinstance(value, _ValueNode):
        return _plain_config(value.state.get("_val"))
    if isinstance(value, dict):
        if "_content" in value and "_metadata" in value:  # vars(DictConfig), how the official trainer saves it
            return _plain_config(value["_content"])
        return {k: _plain_config(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_config(v) for v in value]
    if isinstance(value, (_Metadata, _Marker)):
        return None
    return value


def load_official(path: str | Path) -> dict:
    """Read an official GLIGEN checkpoint without unpickling code, and check its layout.

    `config_dict` comes back as plain dicts (or None when the file has none); see `OMEGACONF_STAND_INS`."""
    try:
        with torch.serialization.safe_globals(OMEGACONF_STAND_INS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, TypeError) as error:  # TypeError: a stand-in used as a class it is not
        # keep torch's one useful line: which global (class) it refused
        lines = [line.strip() for line in str(error).splitlines()]
        detail = [line for line in lines if "Unsupported global" in line or "Trying to" in line] or [str(error)]
        raise InteropError(f"{path}: {UNSAFE_FILE_HELP}{detail[0]}") from None
    checkpoint = check_official_layout(checkpoint, str(path))
    if "config_dict" in checkpoint:
        checkpoint["config_dict"] = _plain_config(checkpoint["config_dict"])
    return checkpoint


# top-level entries of the official trainer's snapshots besides the weights (iteration, optimizer, LR schedule,
# EMA copy of the model)
OFFICIAL_TRAINER_KEYS = ("iters", "opt", "scheduler", "ema")


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
    # released files have exactly these parts; the official trainer's snapshots add its training state, which
    # official inference ignores too (it loads 'model'): ignored here, and named
    extra = sorted(set(map(str, checkpoint)) - set(OFFICIAL_PARTS) - set(OFFICIAL_TRAINER_KEYS))
    if extra:
        raise InteropError(f"{name}: unexpected top-level keys {extra}; expected only {list(OFFICIAL_PARTS)} "
                           f"(and the trainer's {list(OFFICIAL_TRAINER_KEYS)})")
    ignored = [k for k in OFFICIAL_TRAINER_KEYS if k in checkpoint]
    if ignored:
        log.warning("%s: ignoring the official trainer's %s (training state; the weights imported are 'model')",
                    name, ignored)
    return {k: v for k, v in checkpoint.items() if k not in OFFICIAL_TRAINER_KEYS}


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
# official grounding_tokenizer module (config_dict model.params.grounding_tokenizer.target) -> our modality
OFFICIAL_TOKENIZER_MODULES = {
    "text_grounding_net": "box",
    "text_image_grounding_net": "text_image",
    "keypoint_grounding_net": "keypoint",
}
# a key only that variant's position_net has (the full key set is checked by the strict load)
POSITION_NET_MARKERS = {
    "box": "position_net.null_positive_feature",
    "text_image": "position_net.null_text_feature",
    "keypoint": "position_net.person_embeddings",
}


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
    if module not in OFFICIAL_TOKENIZER_MODULES:
        raise InteropError(
            f"official config_dict names grounding tokenizer {target!r}; supported: "
            f"{', '.join(f'{m} ({v})' for m, v in OFFICIAL_TOKENIZER_MODULES.items())} (spatial-map variants such "
            "as depth / canny / semantic need a ConvNeXt tokenizer and extra input channels this project lacks)"
        )
    return OFFICIAL_TOKENIZER_MODULES[module], f"config_dict names {target}"


def official_variant(model_sd: dict, config=None) -> tuple[str, str]:
    """The modality of an official `model` state dict: decided by its position_net keys, cross-checked with the
    config when it is readable. Returns (modality, a note on the config)."""
    position = sorted(k for k in model_sd if k.startswith("position_net."))
    if not position:
        raise InteropError(
            "official 'model': expected GLIGEN layers (`...transformer_blocks.N.fuser.*` and `position_net.*`), "
            f"found {sum('.fuser.' in k for k in model_sd)} fuser keys and 0 position_net keys"
        )
    found = [v for v, marker in POSITION_NET_MARKERS.items() if marker in model_sd]
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
    that rebuild it (`GLIGENModule.make_position_net`). Sizes the module cannot rebuild are an error here."""
    width = unet_config["cross_attention_dim"]

    def shape(name):
        key = f"position_net.{name}"
        if key not in model_sd:
            raise InteropError(f"official 'model': {variant} position_net without {key}")
        return tuple(model_sd[key].shape)

    def fourier(position_dim, coords):
        freqs, rest = divmod(position_dim, 2 * coords)
        if rest:
            raise InteropError(f"official position_net: position feature of {position_dim} dims is no Fourier one")
        return freqs

    if variant == "box":
        (positive_len,) = shape("null_positive_feature")
        freqs = fourier(shape("null_position_feature")[0], 4)
        if (positive_len, freqs) != (width, 8):
            raise InteropError(
                f"official box position_net: phrase width {positive_len}, {freqs} Fourier frequencies; "
                f"this project's box modality needs the cross-attention width {width} and 8"
            )
        return TextBoxTokenizer(positive_len=width, out_dim=width), {}
    if variant == "text_image":
        (in_dim,) = shape("null_text_feature")
        freqs = fourier(shape("null_position_feature")[0], 4)
        if (in_dim, freqs) != (text_width, 8):
            raise InteropError(
                f"official text_image position_net: entity width {in_dim}, {freqs} Fourier frequencies; this "
                f"project's text_image modality needs the text encoder width {text_width} and 8"
            )
        return TextImageBoxTokenizer(in_dim=text_width, out_dim=width), {"modality": "text_image"}
    persons, in_dim = shape("person_embeddings")
    keypoints = shape("keypoint_embeddings")[0]
    freqs = fourier(shape("null_xy_feature")[0], 2)
    if (in_dim, keypoints, freqs) != (width, NUM_KEYPOINTS, 8):
        raise InteropError(
            f"official keypoint position_net: embedding width {in_dim}, {keypoints} keypoints, {freqs} Fourier "
            f"frequencies; this project's keypoint modality needs {width}, {NUM_KEYPOINTS} and 8"
        )
    return KeypointTokenizer(in_dim=width, out_dim=width, max_persons=persons), {
        "modality": "keypoint", "max_persons": persons}


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
    if variant == "text_image":
        clip_note = _copy_clip(clip, base, pretrained, text_encoder)
    ckpt_path = out_dir / "gligen.ckpt"
    grounding = grounding_checkpoint(unet, str(pretrained), **hparams)
    grounding["gligen"]["official"] = {"variant": variant, "modality": hparams.get("modality", "box"),
                                       "config": config_note, "clip": clip_note}
    torch.save(grounding, ckpt_path)
    return pretrained, ckpt_path


def _copy_clip(clip: str | None, base: str, pretrained: Path, text_encoder: CLIPTextModel) -> str | None:
    """Copy the CLIP used for image entities into `pretrained/clip`; returns where it came from (None: none)."""
    if clip is None and (Path(base) / "clip").is_dir():
        clip = str(Path(base) / "clip")
    if clip is None:
        log.warning(
            "text_image import: no CLIP image tower (--clip); image entities need one. Copy a transformers CLIPModel "
            "whose text tower is this text encoder (SD-1.x: openai/clip-vit-large-patch14) to %s/clip", pretrained)
        return None
    model = CLIPModel.from_pretrained(clip)
    if model.config.text_config.hidden_size != text_encoder.config.hidden_size:
        raise InteropError(
            f"CLIP {clip}: text width {model.config.text_config.hidden_size}, the official text encoder's is "
            f"{text_encoder.config.hidden_size}: it is not the CLIP of this model"
        )
    model.save_pretrained(pretrained / "clip")
    try:
        CLIPImageProcessor.from_pretrained(clip).save_pretrained(pretrained / "clip")
    except OSError:  # no preprocessor_config.json: FrozenLDM falls back to CLIP's defaults
        pass
    return clip
