"""`python -m gligen.toy probe-base`: will a world's base LDM draw the shapes it is asked for? Measured before a
full rebuild.

A full toy build pretrains the toy CLIP, the VAE and the UNet (tens of minutes). Whether the base draws shapes
hinges on the UNet and on the object geometry (how many latent cells a shape covers), while a built VAE and text
encoder carry shapes already (the toy report's `vae_reconstruction` and `toy_clip_zero_shot_single_objects`). So
the probe keeps those two from a built LDM, draws `num_images` object scenes of the asked world (its
`object_geometry`) in memory, pretrains only the UNet with the world's `pretrain` settings, and measures what the
toy report measures: the base asked for one object ("a red square"), and VAE reconstructions of single objects of
that geometry (the ceiling). No shards, no cache: nothing it writes can be mistaken for a built world.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from gligen.evaluation.generate import reconstruct, to_pixels
from gligen.evaluation.reporting import command_line
from gligen.ldm import FrozenLDM
from gligen.provenance import git_commit
from gligen.toy import world
from gligen.toy.build import ToyBuildConfig
from gligen.toy.evaluate import attribute_accuracy, detect_objects
from gligen.toy.pretrain import latent_means, train_unet
from gligen.toy.report import shape_on_command


def object_scenes(config: ToyBuildConfig, n: int) -> tuple[torch.Tensor, list[str], float]:
    """The first n train grounding scenes of the world (pixels [n, 3, H, W] in [-1, 1], captions), and their
    mean object count."""
    images, captions, counts = [], [], []
    for index in range(n):
        scene, rng = world.make_scene("train", index, resolution=config.resolution, seed=config.seed,
                                      geometry=config.geometry)
        images.append(world.render_scene(scene))
        captions.append(world.object_caption(rng, [o.category for o in scene.objects]))
        counts.append(len(scene.objects))
    return to_pixels(images), captions, float(np.mean(counts))


def single_object_ceiling(ldm: FrozenLDM, config: ToyBuildConfig, per_pair: int = 4, seed: int = 0) -> dict:
    """Colour recall and shape accuracy of VAE reconstructions of one object per image, sized by the geometry."""
    rng = np.random.default_rng(seed)
    images, layouts = [], []
    for colour, shape in world.SEEN_PAIRS * per_pair:
        box = world.sample_box(rng, config.resolution, config.geometry)
        scene = world.Scene(resolution=config.resolution, objects=[world.SceneObject(shape, colour, box)])
        images.append(world.render_scene(scene))
        layouts.append({"objects": [{"category": f"{colour} {shape}", "box": (0.0, 0.0, 1.0, 1.0)}]})
    return attribute_accuracy([detect_objects(im) for im in reconstruct(ldm, images, seed)], layouts)


def probe_base(ldm_path: str | Path, config: ToyBuildConfig, num_images: int = 16000, seed: int = 0,
               steps: int = 25, guidance: float = 3.0, log=print, command: str | None = None) -> dict:
    start = time.time()
    ldm = FrozenLDM(str(ldm_path))
    if ldm.vae.config.sample_size != config.resolution:
        raise ValueError(f"{ldm_path}: its VAE is for {ldm.vae.config.sample_size} px images, the world asks for "
                         f"{config.resolution}")
    pixels, captions, mean_objects = object_scenes(config, num_images)
    latents = latent_means(ldm.vae, pixels) * ldm.scaling_factor
    # the UNet's cross-attention width is the kept text encoder's, whatever the config's text settings say
    pretrain = replace(config.pretrain, text_width=ldm.text_encoder.config.hidden_size)
    unet_start = time.time()
    ldm.unet = train_unet(latents, captions, ldm.tokenizer, ldm.text_encoder, pretrain, log).requires_grad_(False)
    unet_seconds = time.time() - unet_start
    return {
        "base_ldm_one_object_captions": shape_on_command(ldm, config.resolution, seed=seed, steps=steps,
                                                         guidance=guidance, progress=False),
        "vae_reconstruction_single_objects": single_object_ceiling(ldm, config, seed=seed),
        "data": {"scenes": num_images, "mean_objects_per_scene": mean_objects,
                 "object_geometry": asdict(config.geometry)},
        "setup": {"ldm": str(ldm_path), "pretrain": asdict(pretrain), "unet_seconds": round(unet_seconds, 1),
                  "seconds": round(time.time() - start, 1), "threads": torch.get_num_threads(), "steps": steps,
                  "guidance": guidance, "seed": seed, "git_commit": git_commit(), "command": command or command_line()},
    }


def write_probe(result: dict, out: str | Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=list))
