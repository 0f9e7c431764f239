"""`python -m gligen.toy evaluate`: the toy world's own numbers, written to results/toy/.

1. the exact evaluators on real toy images (boxes on the val split; keypoints on person scenes),
2. the VAE: grounding AP of reconstructed object scenes and PCK of reconstructed person scenes (what the latent
   space can carry at all: no LDM on top of this VAE can score higher),
3. the base LDM, captions only: caption accuracy, and AP against the val layouts (which it never sees); drawing the
   shape a one-object caption names ("a red square": no binding of words to objects needed); and how far apart the
   text encoder puts the shape words (the UNet cannot draw a difference its conditioning does not carry); real
   images noised part way and denoised (SDEdit), with their captions and with the shape words swapped,
4. with --ckpt: a box-grounded GLIGEN at full grounding (beta = 1 throughout sampling),
5. the quality measure (`fidelity_error`, gligen.toy.fidelity) on real images, VAE reconstructions, base samples,
   GLIGEN samples and real images degraded by noise, blur and a colour shift, with the order it must give (real <
   VAE < base < degraded) and each margin in standard errors; and, where the cache has styled val scenes, the style
   read back from the real ones and from the base LDM asked for them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from gligen.evaluation.generate import generate, load_layouts, reconstruct
from gligen.evaluation.reporting import command_line
from gligen.ldm import FrozenLDM, ldm_clip_dir
from gligen.module import GLIGENModule
from gligen.provenance import git_commit
from gligen.sampling import tau_schedule
from gligen.toy import world
from gligen.toy.build import ldm_dir, shard_dir, styled_shard_dir
from gligen.toy.evaluate import (
    attribute_accuracy,
    detect_objects,
    evaluate_boxes,
    evaluate_keypoints,
    toy_layouts,
)
from gligen.toy.fidelity import fidelity_error, read_style

# Ladders of damage to real images, mild to strong: (name, kind, strength), kinds of `degrade`. The measure must
# grow along each ladder, and the strongest step of each must rank below the base LDM's samples.
DEGRADATIONS = (("noise_sigma16", "noise", 16.0), ("noise_sigma32", "noise", 32.0), ("noise_sigma64", "noise", 64.0),
                ("blur_sigma0.5", "blur", 0.5), ("blur_sigma1", "blur", 1.0), ("blur_sigma2", "blur", 2.0),
                ("colour_shift32", "shift", 32.0), ("colour_shift64", "shift", 64.0))


def degrade(image: np.ndarray, kind: str, strength: float, rng: np.random.Generator) -> np.ndarray:
    """A real image damaged: Gaussian noise of std `strength` grey levels, a Gaussian blur of `strength` pixels,
    or a colour shift (+strength red, -strength green)."""
    from scipy.ndimage import gaussian_filter

    pixels = image.astype(np.float64)
    if kind == "noise":
        pixels = pixels + rng.normal(0, strength, pixels.shape)
    elif kind == "blur":
        pixels = gaussian_filter(pixels, (strength, strength, 0))
    elif kind == "shift":
        pixels = pixels + np.array([strength, -strength, 0.0])
    else:
        raise ValueError(f"unknown degradation {kind!r}")
    return np.clip(pixels, 0, 255).round().astype(np.uint8)


def fidelity_summary(images: list[np.ndarray]) -> dict[str, float]:
    errors = np.array([fidelity_error(im) for im in images])
    return {"fidelity_error": float(errors.mean()), "std": float(errors.std(ddof=1)),
            "sem": float(errors.std(ddof=1) / np.sqrt(len(errors))), "n": len(errors)}


def quality_ordering(sets: dict[str, dict[str, float]]) -> dict[str, float | bool]:
    """Whether fidelity_error orders real < VAE < base LDM < the strongest damage of each kind and grows along every
    ladder of damage, with each step's margin in standard errors of the difference (images are independent draws)."""
    chain = ["real", "vae_reconstruction", "base_ldm"]
    out: dict[str, float | bool] = {}
    ladders: dict[str, list[str]] = {}
    for name, kind, _ in DEGRADATIONS:
        ladders.setdefault(kind, []).append(name)
    steps = list(zip(chain, chain[1:])) + [("base_ldm", names[-1]) for names in ladders.values()]
    steps += [pair for names in ladders.values() for pair in zip(names, names[1:])]
    for low, high in steps:
        a, b = sets[low], sets[high]
        gap = b["fidelity_error"] - a["fidelity_error"]
        out[f"{high}_minus_{low}_in_sem"] = float(gap / max(np.hypot(a["sem"], b["sem"]), 1e-12))
    out["ordered"] = all(v > 0 for v in out.values())
    return out


def shape_on_command(ldm: FrozenLDM, resolution: int, repeats: int = 4, **sampling) -> dict[str, float]:
    """Colour recall and shape accuracy of the base LDM asked for one object ("a red square") per image."""
    pairs = [pair for pair in world.SEEN_PAIRS for _ in range(repeats)]
    layouts = [{"key": f"single-{i}", "caption": world.object_phrase(f"{c} {s}"), "width": resolution,
                "height": resolution, "objects": []} for i, (c, s) in enumerate(pairs)]
    images = generate(ldm, layouts, tau_schedule(sampling["steps"], 0.0), **sampling)
    named = [{"objects": [{"category": f"{c} {s}", "box": (0.0, 0.0, 1.0, 1.0)}]} for c, s in pairs]  # box unused
    return attribute_accuracy([detect_objects(im) for im in images], named)


def swap_shape_words(caption: str) -> str:
    """Every shape word replaced by the next shape ("a red square" -> "a red circle")."""
    shapes = world.SHAPES
    return re.sub(r"\b(" + "|".join(shapes) + r")\b", lambda m: shapes[(shapes.index(m[0]) + 1) % len(shapes)],
                  caption)


def from_noised_real(ldm: FrozenLDM, layouts: list[dict], references: list[np.ndarray], strength: float,
                     swap_shapes: bool = False, *, steps: int, guidance: float, seed: int) -> dict[str, float]:
    """SDEdit: real val images noised to `strength` of the schedule and denoised by the base LDM with their caption
    (or with every shape word swapped). How much of the real shapes survives, and whether the caption's shape words
    change that, says where the base loses shape: in denoising (low strength) or in composing (high strength)."""
    asked = ([{**layout, "caption": swap_shape_words(layout["caption"])} for layout in layouts] if swap_shapes
             else layouts)
    images = generate(ldm, asked, tau_schedule(steps, 0.0), seed=seed,
                      steps=steps, guidance=guidance, progress=False, init_images=references, strength=strength)
    metrics = evaluate_boxes(images, layouts)
    return {k: metrics[k] for k in ("ap50", "coarse_ap50", "colour_recall", "shape_accuracy_given_colour")}


def word_similarity(ldm: FrozenLDM) -> dict[str, float]:
    """Mean cosine of the text encoder's states (what the UNet cross-attends to) for "a <colour> <shape>" at the
    shape word between shapes of one colour, and at the colour word between colours of one shape."""
    captions = [world.object_phrase(f"{c} {s}") for c in world.COLOURS for s in world.SHAPES]
    with torch.no_grad():
        states = ldm.text_encoder(ldm.tokenize(captions)).last_hidden_state
    states = torch.nn.functional.normalize(states, dim=-1).view(len(world.COLOURS), len(world.SHAPES), -1,
                                                                 states.shape[-1])
    off_diagonal = ~torch.eye(len(world.SHAPES), dtype=torch.bool)
    shape = states[:, :, 3]  # [BOS, article, colour, shape, EOS]: toy words are one token each
    colour = states[:, :, 2].transpose(0, 1)
    colours_off = ~torch.eye(len(world.COLOURS), dtype=torch.bool)
    return {"shape_word_cosine": float((shape @ shape.transpose(1, 2))[:, off_diagonal].mean()),
            "colour_word_cosine": float((colour @ colour.transpose(1, 2))[:, colours_off].mean())}


def clip_zero_shot(clip_dir: str | Path, resolution: int, repeats: int = 10, seed: int = 0) -> dict[str, float]:
    """The toy CLIP's zero-shot accuracy on single objects drawn alone: the shape among "a <colour> <shape>" of the
    object's colour, and the colour among "a <colour> <shape>" of its shape. A text encoder that cannot tell the
    shapes apart gives the UNet nothing to draw them from."""
    from transformers import AutoTokenizer, CLIPModel

    clip = CLIPModel.from_pretrained(str(clip_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(Path(clip_dir).parent / "tokenizer"))

    def features(output) -> torch.Tensor:  # transformers 5 returns an output object, 4 a tensor
        return torch.nn.functional.normalize(output if torch.is_tensor(output) else output.pooler_output, dim=-1)

    def best(image: np.ndarray, texts: list[str]) -> int:
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
        return int((features(clip.get_text_features(input_ids=ids)) @
                    features(clip.get_image_features(pixel_values=pixels)).T).argmax())

    rng = np.random.default_rng(seed)
    shape_hits = colour_hits = total = 0
    with torch.no_grad():
        for _ in range(repeats):
            for colour in world.COLOURS:
                for shape in world.SHAPES:
                    image = world.render_entity(rng, shape, colour, resolution)
                    shape_hits += world.SHAPES[best(image, [f"a {colour} {s}" for s in world.SHAPES])] == shape
                    colour_hits += world.COLOURS[best(image, [f"a {c} {shape}" for c in world.COLOURS])] == colour
                    total += 1
    return {"shape_accuracy": shape_hits / total, "colour_accuracy": colour_hits / total,
            "shape_chance": 1 / len(world.SHAPES)}


def evaluate_toy(cache: str | Path, ckpt: str | None = None, num_images: int = 200, steps: int = 25,
                 guidance: float = 3.0, seed: int = 0, num_persons: int = 100,
                 sdedit_strengths: tuple[float, ...] = (0.3, 0.5)) -> dict:
    cache = Path(cache)
    config = json.loads((cache / "build_config.json").read_text())
    layouts, references = load_layouts(str(shard_dir(cache, "val", "grounding")), config["resolution"], num_images)
    # person scenes at the build's resolution: the ones the keypoint experiments train and score on
    person_layouts, person_images = toy_layouts("persons", num_persons, config["resolution"])
    results = {
        "evaluator_real_boxes": evaluate_boxes(references, layouts),
        "evaluator_real_keypoints": evaluate_keypoints(person_images, person_layouts),
    }
    ldm = FrozenLDM(str(ldm_dir(cache)))
    reconstructed = reconstruct(ldm, references, seed)
    results["vae_reconstruction"] = evaluate_boxes(reconstructed, layouts)
    results["vae_reconstruction_persons"] = evaluate_keypoints(reconstruct(ldm, person_images, seed), person_layouts)
    sampling = dict(seed=seed, steps=steps, guidance=guidance, progress=False)
    base = generate(ldm, layouts, tau_schedule(steps, 0.0), **sampling)  # beta = 0: exactly the base LDM
    results["base_ldm_captions_only"] = evaluate_boxes(base, layouts)
    results["base_ldm_one_object_captions"] = shape_on_command(ldm, config["resolution"], **sampling)
    results["text_encoder_word_similarity"] = word_similarity(ldm)
    clip = ldm_clip_dir(ldm_dir(cache))
    if clip is not None:
        results["toy_clip_zero_shot_single_objects"] = clip_zero_shot(clip, config["resolution"])
    for strength in sdedit_strengths:
        for swap in (False, True):
            name = f"base_ldm_from_noised_real_strength{strength}" + ("_shape_words_swapped" if swap else "")
            results[name] = from_noised_real(ldm, layouts, references, strength, swap, steps=steps,
                                             guidance=guidance, seed=seed)
    if ckpt:
        module = GLIGENModule.from_checkpoint(ckpt, str(ldm_dir(cache)))
        grounded = generate(module.ldm, layouts, tau_schedule(steps, 1.0), **sampling)
        results["gligen_full_grounding"] = evaluate_boxes(grounded, layouts)
        results["gligen_gates"] = {k: float(v) for k, v in module.gate_values().items()}
    rng = np.random.default_rng(seed)
    quality = {"real": fidelity_summary(references),
               "vae_reconstruction": fidelity_summary(reconstructed),
               "base_ldm": fidelity_summary(base)}
    if ckpt:
        quality["gligen_full_grounding"] = fidelity_summary(grounded)
    for name, kind, strength in DEGRADATIONS:
        quality[name] = fidelity_summary([degrade(im, kind, strength, rng) for im in references])
    results["quality_fidelity_error"] = {name: s["fidelity_error"] for name, s in quality.items()}
    results["quality_fidelity_error_sem"] = {name: s["sem"] for name, s in quality.items()}
    results["quality_ordering"] = quality_ordering(quality)
    styled = styled_shard_dir(cache, "val")
    if (styled / "index.json").exists():
        style_layouts, style_images = load_layouts(str(styled), config["resolution"], num_images)
        asked = [world.caption_style(layout["caption"]) for layout in style_layouts]
        styled_base = generate(ldm, style_layouts, tau_schedule(steps, 0.0), **sampling)
        styled_vae = reconstruct(ldm, style_images, seed)
        results["style_read_back"] = {
            "real": float(np.mean([read_style(im) == s for im, s in zip(style_images, asked)])),
            "vae_reconstruction": float(np.mean([read_style(im) == s for im, s in zip(styled_vae, asked)])),
            "base_ldm": float(np.mean([read_style(im) == s for im, s in zip(styled_base, asked)])),
            "base_ldm_fidelity_error": fidelity_summary(styled_base)["fidelity_error"]}
        for style in world.STYLES:  # which styles the base draws when asked
            mine = [im for im, s in zip(styled_base, asked) if s == style]
            results["style_read_back"][f"base_ldm_{style}"] = float(np.mean([read_style(im) == style for im in mine]))
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
        lines.append(f"- **{name}**: " + ", ".join(f"{k} {v:.3f}" if not isinstance(v, bool) else f"{k} {v}"
                                                    for k, v in metrics.items()))
    lines.append("")
    (out / "README.md").write_text("\n".join(lines))
