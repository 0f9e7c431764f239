"""Grounded sampling with scheduled beta (paper sec. 3.3, "scheduled sampling").

beta multiplies every fuser's residual at each sampler step. The official code gives it as `alpha_type = [a, b, c]`
(fractions of the L steps): the first int(a*L) steps beta = 1, the next int(b*L) steps decay linearly from 1
towards 0 (values (n-1)/n, ..., 1/n, 0, as the official `np.arange(0, 1, 1/n)[::-1]`), the rest beta = 0. The
shorthand tau means [tau, 0, 1 - tau]. Classifier-free guidance runs the unconditional branch with the null
caption "" (or a negative prompt) AND null grounding (every object masked, so only the learned null features reach
the fusers).
"""

from collections.abc import Callable

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler
from diffusers.utils.torch_utils import randn_tensor

from gligen.ldm import FrozenLDM
from gligen.nn.grounded_unet import set_beta

SAMPLERS = {
    "ddim": (DDIMScheduler, {}),
    "plms": (PNDMScheduler, {"skip_prk_steps": True}),  # PLMS = PNDM without Runge-Kutta warm-up steps
    "pndm": (PNDMScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
}


def beta_schedule(num_steps: int, alpha_type: tuple[float, float, float]) -> list[float]:
    """Per-step beta for `num_steps` sampler steps, with the official [a, b, c] semantics and int() step counts."""
    a, b, c = alpha_type
    if min(a, b, c) < 0 or abs(a + b + c - 1) > 1e-6:
        raise ValueError(f"alpha_type must be three fractions >= 0 summing to 1, got {list(alpha_type)}")
    full, decay = int(a * num_steps), int(b * num_steps)
    off = num_steps - full - decay
    return [1.0] * full + [(decay - 1 - i) / decay for i in range(decay)] + [0.0] * off


def tau_schedule(num_steps: int, tau: float) -> list[float]:
    """Shorthand: grounding on for the first fraction tau of the steps, then off."""
    if not 0 <= tau <= 1:
        raise ValueError(f"tau must be in [0, 1], got {tau}")
    return beta_schedule(num_steps, (tau, 0.0, 1.0 - tau))


def make_scheduler(ldm: FrozenLDM, sampler: str):
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
    cls, overrides = SAMPLERS[sampler]
    return cls.from_config({**ldm.scheduler_config, **overrides})


class SamplingInterrupted(RuntimeError):
    """`sample(..., interrupt=...)` stopped because `interrupt()` returned true."""


@torch.no_grad()
def sample(
    ldm: FrozenLDM,
    prompts: list[str],
    grounding: dict | None,
    betas: list[float] | None = None,
    sampler: str = "ddim",
    steps: int = 50,
    guidance: float = 7.5,
    seeds: list[int] | int = 0,
    height: int | None = None,
    width: int | None = None,
    init_latents: torch.Tensor | None = None,
    strength: float = 1.0,
    interrupt: Callable[[], object] | None = None,
    negative_prompt: str = "",
) -> torch.Tensor:
    """Generate one image per prompt; returns pixels in [0, 1], [B, 3, H, W].

    Args:
        ldm: frozen LDM whose UNet carries fusers (see `add_grounding`); a plain UNet works with grounding=None.
        grounding: the position net's inputs for the conditional branch, e.g. box grounding
            {"boxes": [B, N, 4], "masks": [B, N], "positive_embeddings": [B, N, D]}; each sample its own layout.
        betas: beta per step (`beta_schedule` / `tau_schedule`); None = 1 throughout.
        seeds: one seed per image (or a base seed: image i gets seed + i), so an image does not depend on what
            else is in the batch.
        init_latents, strength: SDEdit (image-to-image): noise these (scaled) latents to the step where a fraction
            `strength` of the schedule remains and denoise from there (ddim only); betas still index all `steps`.
        interrupt: checked before every sampler step; when it returns true, `SamplingInterrupted` is raised (a
            preemption signal must not wait for a whole sampling run).
        negative_prompt: caption of the unconditional branch ("" as the paper; the official inference script's
            default is `gligen.presets.OFFICIAL_NEGATIVE_PROMPT`).
    """
    batch = len(prompts)
    device = ldm.unet.device
    betas = [1.0] * steps if betas is None else list(betas)
    if len(betas) != steps:
        raise ValueError(f"{len(betas)} beta values for {steps} steps")
    seeds = [seeds + i for i in range(batch)] if isinstance(seeds, int) else list(seeds)
    scale = 2 ** (len(ldm.vae.config.block_out_channels) - 1)
    height = height or ldm.unet.config.sample_size * scale
    width = width or ldm.unet.config.sample_size * scale

    scheduler = make_scheduler(ldm, sampler)
    scheduler.set_timesteps(steps, device=device)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    shape = (batch, ldm.unet.config.in_channels, height // scale, width // scale)
    latents = randn_tensor(shape, generator=generators, device=device, dtype=ldm.unet.dtype)
    latents = latents * scheduler.init_noise_sigma
    first = 0
    if init_latents is not None:
        if sampler != "ddim" or not 0 < strength <= 1:
            raise ValueError(f"init_latents needs sampler 'ddim' and 0 < strength <= 1, got {sampler!r}, {strength}")
        first = steps - int(steps * strength)  # diffusers img2img rounds down the same way
        if first == steps:
            raise ValueError(f"strength {strength} of {steps} steps leaves no step to run")
        latents = scheduler.add_noise(init_latents.to(latents), latents, scheduler.timesteps[first:first + 1])

    use_cfg = guidance > 1
    context = ldm.encode_captions(list(prompts))
    if use_cfg:  # order [unconditional, conditional], as diffusers' pipelines
        context = torch.cat([ldm.encode_captions([negative_prompt] * batch), context])
        if grounding is not None:
            # every mask zeroed (text_image also has phrases_masks / image_masks), as the official code and diffusers
            null = {k: torch.zeros_like(v) if k.endswith("masks") else v for k, v in grounding.items()}
            grounding = {k: torch.cat([null[k], grounding[k]]) for k in grounding}

    try:
        step, previous = first - 1, None
        for t in scheduler.timesteps[first:]:
            if interrupt is not None and interrupt():
                raise SamplingInterrupted(f"sampling interrupted before step {step + 1} of {steps}")
            if t != previous:  # PLMS evaluates its second timestep twice: one sampler step, one beta
                step, previous = step + 1, t
            set_beta(ldm.unet, betas[step])
            model_input = torch.cat([latents] * 2) if use_cfg else latents
            model_input = scheduler.scale_model_input(model_input, t)
            # beta = 0: skip the grounding tokens altogether (the fusers would return their input anyway)
            kwargs = {"gligen": grounding} if grounding is not None and betas[step] != 0 else None
            noise = ldm.unet(model_input, t, encoder_hidden_states=context, cross_attention_kwargs=kwargs).sample
            if use_cfg:
                uncond, cond = noise.chunk(2)
                noise = uncond + guidance * (cond - uncond)
            latents = scheduler.step(noise, t, latents).prev_sample
    finally:
        set_beta(ldm.unet, 1.0)
    return (ldm.decode_latents(latents).float() + 1) / 2
