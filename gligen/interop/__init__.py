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

from gligen.interop.export import (
    StableDiffusionGLIGENPipeline,
    StableDiffusionGLIGENTextImagePipeline,
    check_exportable,
    export_keypoint,
    export_to_diffusers,
)
from gligen.interop.official import import_official
from gligen.interop.safe_load import InteropError, load_official

__all__ = ["InteropError", "StableDiffusionGLIGENPipeline", "StableDiffusionGLIGENTextImagePipeline",
           "check_exportable", "export_keypoint", "export_to_diffusers", "import_official", "load_official"]
