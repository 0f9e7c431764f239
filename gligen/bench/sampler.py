"""Our sampler against diffusers' StableDiffusionGLIGENPipeline on the same exported weights.

Both run the same DDIM steps, guidance, scheduled-sampling tau and initial noise; times are medians of alternating
runs (the machine is noisy), and the images are compared pixel for pixel.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch
from diffusers.utils.torch_utils import randn_tensor

from gligen.interop import StableDiffusionGLIGENPipeline, export_to_diffusers
from gligen.module import GLIGENModule
from gligen.sampling import sample, tau_schedule


def bench_sampler(ckpt: str, layout: dict, *, pretrained: str | None = None, steps: int = 25, guidance: float = 3.0,
                  tau: float = 0.3, seed: int = 0, repeats: int = 3) -> dict:
    """layout: {"prompt", "boxes": [[x0, y0, x1, y1], ...], "phrases": [...]} (one image per call, as diffusers'
    pipeline takes one layout per prompt). Returns median seconds of each and the largest pixel difference."""
    module = GLIGENModule.from_checkpoint(ckpt, pretrained)
    ldm = module.ldm
    objects = [{"box": box, "phrase": phrase} for box, phrase in zip(layout["boxes"], layout["phrases"])]
    betas = tau_schedule(steps, tau)

    def ours() -> torch.Tensor:  # phrase encoding included, as the pipeline encodes them per call too
        grounding = module.modality.layout_inputs(ldm, [{"objects": objects}], module.hparams.max_objects)
        return sample(ldm, [layout["prompt"]], grounding, betas, "ddim", steps, guidance, [seed])

    with tempfile.TemporaryDirectory() as tmp:
        export_to_diffusers(ckpt, tmp, pretrained)
        pipe = StableDiffusionGLIGENPipeline.from_pretrained(tmp)
    pipe.set_progress_bar_config(disable=True)
    size = ldm.unet.config.sample_size
    shape = (1, ldm.unet.config.in_channels, size, size)

    def theirs() -> torch.Tensor:
        latents = randn_tensor(shape, generator=[torch.Generator("cpu").manual_seed(seed)], dtype=torch.float32)
        return pipe(prompt=layout["prompt"], gligen_phrases=layout["phrases"], gligen_boxes=layout["boxes"],
                    gligen_scheduled_sampling_beta=tau, num_inference_steps=steps, guidance_scale=guidance,
                    latents=latents, output_type="pt").images

    images, times = {}, {"ours": [], "diffusers": []}
    for name, run in (("ours", ours), ("diffusers", theirs)):
        images[name] = run()  # warm-up, and the images compared below
    for _ in range(repeats):
        for name, run in (("ours", ours), ("diffusers", theirs)):  # alternate: load changes hit both alike
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    ours_s, theirs_s = statistics.median(times["ours"]), statistics.median(times["diffusers"])
    return {"ours_s": ours_s, "diffusers_s": theirs_s, "ratio": ours_s / theirs_s,
            "max_pixel_diff": float((images["ours"] - images["diffusers"]).abs().max()), "steps": steps,
            "guidance": guidance, "tau": tau, "repeats": repeats}
