"""`python -m gligen.toy evaluate`: the toy world's own numbers, written to results/toy/.

1. the exact evaluators on real toy images (boxes on the val split; keypoints on person scenes),
2. the VAE: grounding AP of reconstructions (what the latent space can carry at all),
3. the base LDM, captions only: caption accuracy, and AP against the val layouts (which it never sees),
4. with --ckpt: a box-grounded GLIGEN at full grounding (beta = 1 throughout sampling).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from gligen.evaluation import generate, load_layouts
from gligen.ldm import FrozenLDM
from gligen.reporting import command_line
from gligen.results import git_commit
from gligen.sampling import tau_schedule

from . import world
from .build import ldm_dir, shard_dir
from .evaluate import evaluate_boxes, evaluate_keypoints


def person_scenes(n: int, seed: int = 0) -> tuple[list[np.ndarray], list[dict]]:
    images, layouts = [], []
    for index in range(n):
        scene, _ = world.make_scene("val", index, family="persons", seed=seed)
        images.append(world.render_scene(scene))
        layouts.append(world.scene_annotation(scene, "grounding", f"person-{index}", with_entities=False))
    return images, layouts


def evaluate_toy(cache: str | Path, ckpt: str | None = None, num_images: int = 200, steps: int = 25,
                 guidance: float = 3.0, seed: int = 0, num_persons: int = 100) -> dict:
    cache = Path(cache)
    config = json.loads((cache / "build_config.json").read_text())
    layouts, references = load_layouts(str(shard_dir(cache, "val", "grounding")), config["resolution"], num_images)
    person_images, person_layouts = person_scenes(num_persons)
    results = {
        "evaluator_real_boxes": evaluate_boxes(references, layouts),
        "evaluator_real_keypoints": evaluate_keypoints(person_images, person_layouts),
    }
    ldm = FrozenLDM(str(ldm_dir(cache)))
    pixels = torch.from_numpy(np.stack(references)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        reconstructed = ldm.decode_latents(ldm.encode_images(pixels, torch.Generator().manual_seed(seed)))
    reconstructed = ((reconstructed + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    results["vae_reconstruction"] = evaluate_boxes(list(reconstructed.numpy()), layouts)
    sampling = dict(seed=seed, steps=steps, guidance=guidance, progress=False)
    base = generate(ldm, layouts, tau_schedule(steps, 0.0), **sampling)  # beta = 0: exactly the base LDM
    results["base_ldm_captions_only"] = evaluate_boxes(base, layouts)
    if ckpt:
        from gligen.module import GLIGENModule

        module = GLIGENModule.from_checkpoint(ckpt, str(ldm_dir(cache)))
        grounded = generate(module.ldm, layouts, tau_schedule(steps, 1.0), **sampling)
        results["gligen_full_grounding"] = evaluate_boxes(grounded, layouts)
        results["gligen_gates"] = {k: float(v) for k, v in module.gate_values().items()}
    results["setup"] = {"num_images": len(layouts), "steps": steps, "guidance": guidance, "seed": seed,
                        "sampler": "ddim", "ckpt": ckpt, "git_commit": git_commit(), "command": command_line()}
    return results


def write_report(results: dict, out: str | Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(results, indent=1))
    setup = results["setup"]
    lines = ["# Toy world: measured numbers", "", f"Command: `{setup['command']}` (commit `{setup['git_commit']}`; "
             f"{setup['num_images']} val layouts, DDIM {setup['steps']} steps, guidance {setup['guidance']}, "
             f"seed {setup['seed']}).", ""]
    for name, metrics in results.items():
        if name in ("setup", "gligen_gates"):
            continue
        lines.append(f"- **{name}**: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    lines.append("")
    (out / "README.md").write_text("\n".join(lines))
