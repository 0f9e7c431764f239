"""Sweep one checkpoint over tau (scheduled sampling): the one implementation behind experiments/ablate_beta.py and
every cell of experiments/grid.py.

`sweep_checkpoint` loads a trained GLIGEN checkpoint on its frozen LDM, samples the validation layouts at every
tau x seed (`gligen.evaluation.generate.beta_sweep`), and writes the results with
`gligen.evaluation.reporting.write_beta_sweep`
(metrics.csv, summary.md, plots, sample grids, TensorBoard). With `resume=True` it is idempotent: it writes
`<out>/sweep_done.json` last and returns at once when that marker exists for the same sweep config, so a requeued
Slurm task or a second `run-local` does not redo a finished sweep (an interrupted one, without the marker, is redone
from the start).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from gligen.checkpoint_file import checkpoint_identity
from gligen.evaluation import reporting
from gligen.evaluation.generate import beta_sweep, load_layouts
from gligen.evaluation.results import checkpoint_columns
from gligen.experiments.provenance import run_columns
from gligen.ldm import ldm_clip_dir
from gligen.metrics.detectors import make_image_scorer
from gligen.module import GLIGENModule
from gligen.provenance import config_hash, git_commit

DONE = "sweep_done.json"


def sweep_done(out: str | Path, config: dict | None = None, identity: dict | None = None) -> bool:
    """True when `out` holds a finished sweep (of `config`, when given: same config hash; of the checkpoint whose
    `checkpoint_identity` is `identity`, when given: same weights, so a checkpoint trained further since is swept
    again)."""
    marker = Path(out) / DONE
    if not marker.exists():
        return False
    done = json.loads(marker.read_text())
    if config is not None and done.get("config_hash") != config_hash(config):
        return False
    return identity is None or done.get("weights_hash") == identity["weights_hash"]


def sweep_checkpoint(config: dict, *, resume: bool = False, provenance: dict | None = None) -> Path:
    """Runs the tau sweep that `config` describes and writes it to `config["out"]`; returns that directory.

    `config` keys (those of experiments/configs/ablate_beta.yaml): ckpt, pretrained, val_shards, resolution,
    num_images, taus, seeds, sampler, steps, guidance, batch_size, detector ("toy" or a transformers detector
    directory / hub id), out; optional: pose_detector ("toy" (default) or "module:callable", a PoseDetector: the
    keypoint modality's detector), entity_resolution (side of the entity images of image / text_image layouts),
    image_scorer (an ImageScorer name or "module:callable", e.g. "toy_image": per-image fidelity_error and
    style_adherence of every row).
    Every row gets git_commit, config_hash (of `config`), num_images and ckpt, plus `provenance` (extra columns,
    e.g. a grid cell's axes).

    Every modality sweeps: the checkpoint's modality (GLIGENModule's) decides how the val layouts are read (keypoint:
    persons; image / text_image: with their entity images), sampled, and scored (`Modality.metrics`: box
    ap / ap50 / ap75 / miou, keypoint pck / oks_ap*, image / text_image entity_ap* / entity_miou), FID / KID for all.
    """
    out = Path(config["out"])
    if not config.get("ckpt") or not config.get("val_shards"):
        raise SystemExit("--ckpt and --val-shards are required outside the toy world")
    identity = checkpoint_identity(config["ckpt"])
    if identity["weights_changed"]:
        raise SystemExit(f"{config['ckpt']}: its weights are not those its training saved (weights hash "
                         f"{identity['weights_hash']}, training recorded another): edited after training; not swept")
    if resume and sweep_done(out, config, identity):
        print(f"sweep already done: {out} ({DONE}, same config and checkpoint weights); not redone")
        return out
    if identity["complete"] is False:
        print(f"warning: {config['ckpt']} is half-trained (step {identity['global_step']} of "
              f"{identity['max_steps']}); its rows say so (ckpt_complete False)")
    (out / DONE).unlink(missing_ok=True)  # a changed config is swept again

    module = GLIGENModule.from_checkpoint(config["ckpt"], config["pretrained"])
    modality = module.modality
    layouts, references = load_layouts(config["val_shards"], config["resolution"], config["num_images"],
                                       entity_images=modality.entity_images,
                                       entity_resolution=config.get("entity_resolution"))
    try:
        modality.check_layouts(layouts, config["val_shards"])
        detector = modality.detector(config)
        image_scorer = make_image_scorer(config.get("image_scorer"))
    except ValueError as error:
        raise SystemExit(str(error)) from None
    start = time.perf_counter()
    rows, grids = beta_sweep(
        module.ldm, layouts, references, config["taus"], config["seeds"], detector,
        sampler=config["sampler"], steps=config["steps"], guidance=config["guidance"],
        batch_size=config["batch_size"], clip_dir=ldm_clip_dir(config["pretrained"]), modality=modality,
        image_scorer=image_scorer,
    )
    common = {"git_commit": git_commit(), "config_hash": config_hash(config), "num_images": len(layouts),
              **checkpoint_columns(config["ckpt"], identity), "modality": modality.name, **(provenance or {}),
              **run_columns(time.perf_counter() - start)}
    rows = [{**row, **common} for row in rows]
    reporting.write_beta_sweep(out, rows, grids, layouts, config)
    if resume:
        (out / DONE).write_text(json.dumps({"config_hash": config_hash(config), "ckpt": str(config["ckpt"]),
                                            "global_step": identity["global_step"],
                                            "weights_hash": identity["weights_hash"],
                                            "git_commit": rows[0]["git_commit"]}, indent=1))
    return out

