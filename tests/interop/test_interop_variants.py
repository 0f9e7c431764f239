"""Interop of the text+image and keypoint variants, and official files whose config_dict is pickled OmegaConf.

Official-layout checkpoints are built from a GLIGENModule with the official naming rules of tests/helpers.py
(`official_checkpoint`: LDM UNet / VAE / CLIP names; position_net keys are the same in the official code, diffusers
and here). Their `config_dict` is pickled the way the official trainer saves it: `vars(config)` of an OmegaConf
DictConfig, i.e. a plain dict around DictConfig / ListConfig / AnyNode / metadata objects. omegaconf is not
installed here, so `fake_omegaconf` registers small stand-in classes under OmegaConf's module and class names that
pickle as OmegaConf 2.1 does (NEWOBJ + BUILD with `__getstate__`, dataclass metadata holding typing.Any and dict).
"""

import contextlib
import dataclasses
import io
import pickle
import sys
import types
import typing
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from gligen.interop import (
    InteropError,
    StableDiffusionGLIGENTextImagePipeline,
    export_to_diffusers,
    import_official,
    load_official,
)
from gligen.interop.__main__ import main as convert_main
from gligen.module import GLIGENModule
from gligen.sampling import sample
from gligen.toy.pipeline import TinyPipelineConfig, build_tiny_pipeline
from tests import helpers
from tests.helpers import (
    assert_same_grounded_output,
    assert_same_ldm_weights,
    grounded_module,
    official_checkpoint,
    save_like_lightning,
)

CLIP_SIZE = 24  # vision tower image_size of the tiny CLIP

# ---------------------------------------------------------------------------------------------------------------------
# OmegaConf stand-ins, pickled like the real classes
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Metadata:
    ref_type: typing.Any
    object_type: typing.Any
    optional: bool
    key: typing.Any
    flags: dict = dataclasses.field(default_factory=dict)
    flags_root: bool = False


@dataclasses.dataclass
class ContainerMetadata(Metadata):
    key_type: typing.Any = None
    element_type: typing.Any = None


class Node:
    def __getstate__(self):  # as OmegaConf: the state is __dict__ without the flags cache
        state = dict(self.__dict__)
        state.pop("_flags_cache", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)


class AnyNode(Node):
    def __init__(self, value, key, parent):
        self._metadata = Metadata(ref_type=typing.Any, object_type=None, optional=True, key=key)
        self._parent, self._val, self._flags_cache = parent, value, None


class DictConfig(Node):
    def __init__(self, content: dict, key=None, parent=None):
        self._metadata = ContainerMetadata(ref_type=typing.Any, object_type=dict, optional=True, key=key,
                                           key_type=typing.Any, element_type=typing.Any)
        self._parent, self._flags_cache = parent, None
        self._content = {k: _node(v, k, self) for k, v in content.items()}


class ListConfig(Node):
    def __init__(self, content: list, key=None, parent=None):
        self._metadata = ContainerMetadata(ref_type=typing.Any, object_type=list, optional=True, key=key,
                                           key_type=int, element_type=typing.Any)
        self._parent, self._flags_cache = parent, None
        self._content = [_node(v, i, self) for i, v in enumerate(content)]


def _node(value, key, parent):
    if isinstance(value, dict):
        return DictConfig(value, key, parent)
    if isinstance(value, list):
        return ListConfig(value, key, parent)
    return AnyNode(value, key, parent)


FAKE_NAMES = {"omegaconf.dictconfig": [DictConfig], "omegaconf.listconfig": [ListConfig],
              "omegaconf.nodes": [AnyNode], "omegaconf.base": [Metadata, ContainerMetadata, Node]}


@contextlib.contextmanager
def fake_omegaconf():
    """Make the stand-ins pickle under OmegaConf's names (pickle checks `sys.modules[module].qualname is cls`)."""
    saved = {name: sys.modules.get(name) for name in ["omegaconf", *FAKE_NAMES]}
    originals = {cls: (cls.__module__, cls.__qualname__) for classes in FAKE_NAMES.values() for cls in classes}
    try:
        sys.modules["omegaconf"] = types.ModuleType("omegaconf")
        for module_name, classes in FAKE_NAMES.items():
            module = sys.modules[module_name] = types.ModuleType(module_name)
            for cls in classes:
                cls.__module__, cls.__qualname__ = module_name, cls.__name__
                setattr(module, cls.__name__, cls)
        yield
    finally:
        for cls, (module_name, qualname) in originals.items():
            cls.__module__, cls.__qualname__ = module_name, qualname
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


TOKENIZER_MODULES = {"box": "text_grounding_net", "text_image": "text_image_grounding_net",
                     "keypoint": "keypoint_grounding_net"}


def official_config(variant: str) -> dict:
    """The shape of an official training config (configs/*.yaml plus the argparse options main.py merges in)."""
    tokenizer_params = {"max_persons_per_image": 8, "out_dim": 768} if variant == "keypoint" else {
        "in_dim": 768, "out_dim": 768}
    return {
        "model": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                  "params": {"image_size": 64, "in_channels": 4, "out_channels": 4, "model_channels": 320,
                             "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
                             "num_heads": 8, "transformer_depth": 1, "context_dim": 768, "fuser_type": "gatedSA",
                             "use_checkpoint": True,
                             "grounding_tokenizer": {
                                 "target": f"ldm.modules.diffusionmodules.{TOKENIZER_MODULES[variant]}.PositionNet",
                                 "params": tokenizer_params}}},
        "autoencoder": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {"scale_factor": 0.18215}},
        "text_encoder": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"},
        "diffusion": {"target": "ldm.models.diffusion.ldm.LatentDiffusion",
                      "params": {"linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000}},
        "name": f"{variant}_run", "base_learning_rate": 5e-5, "warmup_steps": 10000, "total_iters": 500000,
        "disable_inference_in_training": False,
    }


def save_official(checkpoint: dict, variant: str, path, config=None) -> None:
    """torch.save as the official trainer does: config_dict = vars(DictConfig)."""
    with fake_omegaconf():
        config_dict = vars(DictConfig(official_config(variant) if config is None else config))
        torch.save({**checkpoint, "config_dict": config_dict}, path)


def add_clip(root, projection_dim: int, seed: int = 1) -> str:
    return helpers.add_clip(root, projection_dim, CLIP_SIZE, seed)


def entity_image(seed: int) -> Image.Image:
    """An RGB image already at the CLIP input size (so no resampling differences between preprocessors)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (CLIP_SIZE, CLIP_SIZE, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def clip_base(tmp_path_factory) -> str:
    """The conftest-sized tiny LDM (seed 0) with a CLIP whose projection width equals the text width (32)."""
    root = build_tiny_pipeline(tmp_path_factory.mktemp("clip_base"), TinyPipelineConfig(), seed=0)
    return add_clip(root, projection_dim=32)


def randomized(module: GLIGENModule) -> GLIGENModule:
    with torch.no_grad():
        for p in module.ldm.unet.position_net.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return module.eval()


def text_image_grounding(ldm, g, batch=2) -> dict:
    return {
        "boxes": torch.rand(batch, 30, 4, generator=g).sort(-1).values,
        "masks": (torch.rand(batch, 30, generator=g) > 0.3).float(),
        "phrases_masks": (torch.rand(batch, 30, generator=g) > 0.5).float(),
        "image_masks": (torch.rand(batch, 30, generator=g) > 0.5).float(),
        "phrases_embeddings": torch.randn(batch, 30, 32, generator=g),
        "image_embeddings": torch.randn(batch, 30, 32, generator=g) * 5,
    }


def keypoint_grounding(max_persons, g, batch=2) -> dict:
    return {"points": torch.rand(batch, max_persons, 17, 2, generator=g),
            "masks": (torch.rand(batch, max_persons, 17, generator=g) > 0.4).float()}


# ---------------------------------------------------------------------------------------------------------------------
# 1. config_dict: OmegaConf read as data, nothing else unpickled
# ---------------------------------------------------------------------------------------------------------------------


def test_official_omegaconf_config_dict_loads_as_plain_data(tmp_path):
    parts = {"model": {"position_net.null_text_feature": torch.zeros(2)}, "autoencoder": {}, "text_encoder": {},
             "diffusion": {"betas": torch.ones(3)}}
    save_official(parts, "text_image", tmp_path / "official.pth")
    assert "omegaconf" not in sys.modules  # the fakes are gone again; loading below must not need them
    with zipfile.ZipFile(tmp_path / "official.pth") as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    # the file really holds OmegaConf globals, and torch's plain weights_only load refuses it
    assert b"omegaconf.dictconfig" in data and b"omegaconf.nodes" in data and b"typing" in data
    with pytest.raises(pickle.UnpicklingError, match="omegaconf"):
        torch.load(tmp_path / "official.pth", weights_only=True)

    loaded = load_official(tmp_path / "official.pth")
    assert loaded["config_dict"] == official_config("text_image")  # every value, lists included, as plain data
    assert torch.equal(loaded["diffusion"]["betas"], torch.ones(3))
    assert "omegaconf" not in sys.modules  # no OmegaConf code ran or was imported


class NotAConfig:  # any class other than the OmegaConf containers must still be refused
    pass


def test_other_globals_in_the_config_are_still_refused(tmp_path):
    parts = {"model": {}, "autoencoder": {}, "text_encoder": {}, "diffusion": {}}
    config = official_config("box")
    config["model"]["params"]["callback"] = NotAConfig()
    save_official(parts, "box", tmp_path / "a.pth", config)
    with pytest.raises(InteropError, match=r"(?s)never unpickles arbitrary objects.*Unsupported global.*NotAConfig"):
        load_official(tmp_path / "a.pth")

    # a pickle that tries to *call* an allow-listed marker (typing.Any(...)) or os.system is refused too
    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned",))

    torch.save({**parts, "config_dict": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(InteropError, match=r"(?s)weights_only=True.*(system|posix|os)"):
        load_official(tmp_path / "evil.pth")

    class CallsAny:
        def __reduce__(self):
            return (typing.Any, ())

    torch.save({**parts, "config_dict": CallsAny()}, tmp_path / "any.pth")
    with pytest.raises(InteropError, match=r"(?s)weights_only=True.*typing\.Any"):
        load_official(tmp_path / "any.pth")
    buffer = io.BytesIO()
    torch.save({**parts, "config_dict": None}, buffer)  # baseline: a None config is fine
    buffer.seek(0)
    (tmp_path / "none.pth").write_bytes(buffer.read())
    assert load_official(tmp_path / "none.pth")["config_dict"] is None


# ---------------------------------------------------------------------------------------------------------------------
# 2. from-official: text_image and keypoint
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def official_variants(tmp_path_factory):
    """Official-layout text_image and keypoint checkpoints whose base weights differ from --base (seed 1)."""
    tmp = tmp_path_factory.mktemp("official_variants")
    source = str(build_tiny_pipeline(tmp / "seed1", TinyPipelineConfig(), seed=1))
    out = {}
    for variant, kwargs in {"text_image": {"modality": "text_image"},
                            "keypoint": {"modality": "keypoint", "max_persons": 3}}.items():
        module = grounded_module(source, seed=2, **kwargs)
        checkpoint = official_checkpoint(module)
        save_official(checkpoint, variant, tmp / f"{variant}.pth")
        out[variant] = (module, checkpoint, tmp / f"{variant}.pth")
    return out


@pytest.mark.parametrize("variant", ["text_image", "keypoint"])
def test_official_variant_imports_every_weight(official_variants, clip_base, tmp_path, variant, capsys):
    original, checkpoint, path = official_variants[variant]
    position_keys = {k for k in checkpoint["model"] if k.startswith("position_net.")}
    expected_keys = {
        "text_image": {"null_text_feature", "null_image_feature", "null_position_feature",
                       *(f"linears_{m}.{i}.{p}" for m in ("text", "image") for i in (0, 2, 4)
                         for p in ("weight", "bias"))},
        "keypoint": {"person_embeddings", "keypoint_embeddings", "null_person_feature", "null_xy_feature",
                     *(f"linears.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias"))},
    }[variant]
    assert position_keys == {f"position_net.{k}" for k in expected_keys}  # the official names

    convert_main(["from-official", str(path), str(tmp_path / "imported"), "--base", clip_base])
    assert f"modality {variant}" in capsys.readouterr().out
    imported = GLIGENModule.from_checkpoint(str(tmp_path / "imported" / "gligen.ckpt")).eval()
    assert imported.hparams.modality == variant
    if variant == "keypoint":
        assert imported.hparams.max_persons == 3
    else:  # the CLIP for image entities came from <base>/clip
        assert imported.ldm.has_clip and (tmp_path / "imported" / "pretrained" / "clip" / "config.json").is_file()
    info = torch.load(tmp_path / "imported" / "gligen.ckpt", weights_only=True)["gligen"]["official"]
    assert info["variant"] == variant and "config_dict names ldm.modules" in info["config"]
    assert_same_ldm_weights(original, imported)

    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    grounding = text_image_grounding(original.ldm, g) if variant == "text_image" else keypoint_grounding(3, g)
    assert_same_grounded_output(original, imported, x, context, grounding)


def _damaged(checkpoint, drop=(), add=None):
    model = {k: v for k, v in checkpoint["model"].items() if k not in drop}
    model.update(add or {})
    return {**checkpoint, "model": model}


def test_official_variant_errors_list_keys(official_variants, clip_base, tmp_path):
    _, text_image, _ = official_variants["text_image"]
    _, keypoint, _ = official_variants["keypoint"]
    cases = [
        # config and keys disagree
        (text_image, "keypoint", r"inconsistent: config_dict names .*keypoint_grounding_net.*\(keypoint\).*text_image"),
        # a leftover / a missing position_net key
        (_damaged(text_image, add={"position_net.bogus": torch.zeros(2)}), "text_image",
         r"not in the model.*position_net\.bogus"),
        (_damaged(keypoint, drop=["position_net.null_xy_feature"]), "keypoint",
         r"keypoint position_net without position_net\.null_xy_feature"),
        (_damaged(keypoint, drop=["position_net.linears.2.bias"]), "keypoint",
         r"missing from the file: position_net\.linears\.2\.bias"),
        # keys of two variants at once
        (_damaged(keypoint, add={"position_net.null_text_feature": torch.zeros(32)}), "keypoint",
         r"cannot tell the position_net variant.*person_embeddings.*null_text_feature"),
    ]
    for i, (bad, variant, message) in enumerate(cases):
        save_official(bad, variant, tmp_path / f"bad{i}.pth")
        with pytest.raises(InteropError, match=message):
            import_official(tmp_path / f"bad{i}.pth", tmp_path / f"out{i}", base=clip_base)
    config = official_config("text_image")
    config["model"]["params"]["grounding_tokenizer"]["target"] = "ldm.modules.diffusionmodules.depth.PositionNet"
    save_official(text_image, "text_image", tmp_path / "depth.pth", config)
    with pytest.raises(InteropError, match=r"grounding tokenizer .*depth\.PositionNet.*supported"):
        import_official(tmp_path / "depth.pth", tmp_path / "depth", base=clip_base)


def test_official_variant_without_readable_config_uses_the_keys(official_variants, clip_base, tmp_path):
    _, keypoint, _ = official_variants["keypoint"]
    torch.save({**keypoint, "config_dict": None}, tmp_path / "k.pth")
    _, ckpt = import_official(tmp_path / "k.pth", tmp_path / "out", base=clip_base)
    info = torch.load(ckpt, weights_only=True)["gligen"]["official"]
    assert info == {"variant": "keypoint", "modality": "keypoint", "config": "the file has no readable config_dict",
                    "clip": None}


# ---------------------------------------------------------------------------------------------------------------------
# 3. to-diffusers: text_image -> StableDiffusionGLIGENTextImagePipeline; keypoint -> this project's format
# ---------------------------------------------------------------------------------------------------------------------


def test_text_image_export_loads_in_diffusers_and_gives_our_images(clip_base, tmp_path):
    torch.manual_seed(0)
    module = randomized(GLIGENModule(clip_base, modality="text_image", gamma_init=0.5))
    save_like_lightning(module, tmp_path / "m.ckpt")
    convert_main(["to-diffusers", str(tmp_path / "m.ckpt"), str(tmp_path / "exported")])
    pipe = StableDiffusionGLIGENTextImagePipeline.from_pretrained(tmp_path / "exported")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.attention_type == "gated-text-image"
    ours, theirs = module.ldm.unet.state_dict(), pipe.unet.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)

    # image entity features: diffusers' processor -> image_encoder -> image_project -> x 28.7 / norm, vs ours
    image = entity_image(0)
    with torch.no_grad():
        theirs_feature = pipe.get_clip_feature(image, 28.7, torch.device("cpu"), is_image=True)[0]
    ours_feature = module.ldm.encode_entity_images([image])[0]
    # measured max |diff| 1.9e-6 on norm-28.7 vectors, CPU fp32 (float32 preprocessing / matmul order)
    assert torch.allclose(theirs_feature, ours_feature, atol=1e-4, rtol=0), (theirs_feature - ours_feature).abs().max()

    phrases, boxes = ["red square", "blue circle"], [[0.1, 0.1, 0.5, 0.6], [0.45, 0.3, 0.95, 0.9]]
    grounding = {
        "boxes": torch.zeros(1, 30, 4), "masks": torch.zeros(1, 30), "phrases_masks": torch.zeros(1, 30),
        "image_masks": torch.zeros(1, 30), "phrases_embeddings": module.ldm.encode_phrases([phrases + [""] * 28]),
        "image_embeddings": torch.zeros(1, 30, 32),
    }
    grounding["boxes"][0, :2] = torch.tensor(boxes)
    grounding["masks"][0, :2] = grounding["phrases_masks"][0, :2] = 1
    grounding["image_masks"][0, 0] = 1  # box 0: phrase + image; box 1: phrase only
    grounding["image_embeddings"][0, 0] = ours_feature

    # beta 1 throughout (the text-image pipeline ignores gligen_scheduled_sampling_beta); guidance 5 so the
    # unconditional branch (null caption, every grounding mask zeroed) is compared too
    steps, seed, prompt, guidance = 4, 3, "a red square and a blue circle", 5.0
    ours_image = sample(module.ldm, [prompt], grounding, None, "ddim", steps, guidance, [seed])
    size = module.ldm.unet.config.sample_size
    from diffusers.utils.torch_utils import randn_tensor

    latents = randn_tensor((1, 4, size, size), generator=[torch.Generator("cpu").manual_seed(seed)])
    theirs_image = pipe(prompt=prompt, gligen_phrases=phrases, gligen_images=[image, None], gligen_boxes=boxes,
                        num_inference_steps=steps, guidance_scale=guidance, latents=latents, output_type="pt").images
    ungrounded = sample(module.ldm, [prompt], None, None, "ddim", steps, guidance, [seed])
    assert (ours_image - ungrounded).abs().max() > 1e-2  # grounding matters in this comparison
    assert theirs_image.shape == ours_image.shape
    # the image feature's float error through 4 guided steps (CPU fp32, well under 1e-5); 1e-4 leaves room for
    # other kernels / devices
    assert torch.allclose(theirs_image, ours_image, atol=1e-4, rtol=0), (theirs_image - ours_image).abs().max()


def test_text_image_export_needs_a_square_clip_projection(tmp_path):
    root = build_tiny_pipeline(tmp_path / "ldm", TinyPipelineConfig(), seed=0)
    add_clip(root, projection_dim=16)
    module = GLIGENModule(str(root), modality="text_image")
    save_like_lightning(module, tmp_path / "m.ckpt")
    with pytest.raises(InteropError, match=r"projects to 16 dims.*CLIPImageProjection is square"):
        export_to_diffusers(tmp_path / "m.ckpt", tmp_path / "out")


def test_keypoint_export_writes_the_project_format(tiny_pretrained, tmp_path, capsys):
    torch.manual_seed(0)
    module = randomized(GLIGENModule(tiny_pretrained, modality="keypoint", max_persons=2, gamma_init=0.5))
    save_like_lightning(module, tmp_path / "m.ckpt")
    convert_main(["to-diffusers", str(tmp_path / "m.ckpt"), str(tmp_path / "exported")])
    assert "no keypoint pipeline" in capsys.readouterr().out
    loaded = GLIGENModule.from_checkpoint(str(tmp_path / "exported" / "gligen.ckpt")).eval()
    assert loaded.hparams.pretrained == str((tmp_path / "exported" / "pretrained").resolve())
    assert (loaded.hparams.modality, loaded.hparams.max_persons) == ("keypoint", 2)
    a, b = module.ldm.unet.state_dict(), loaded.ldm.unet.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # the plain UNet in pretrained/ is the base one (no fusers, no attention_type)
    import json

    config = json.loads((tmp_path / "exported" / "pretrained" / "unet" / "config.json").read_text())
    assert config.get("attention_type", "default") == "default"
