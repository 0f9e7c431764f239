"""The toy world's shipped weights: the pretrained base LDM and the reference box-grounded GLIGEN checkpoint behind
the committed results/ablate_beta, inside the package, so the default experiment needs no pretraining.

    gligen/toy/shipped/ldm/                  the base LDM as `python -m gligen.toy build` pretrains it (a diffusers
                                             Stable Diffusion directory with clip/, safetensors weights)
    gligen/toy/shipped/toy_box.safetensors   the grounding layers (fusers + position_net) trained by
                                             experiments/configs/toy_base.yaml + toy_box.yaml on that base;
                                             hyper-parameters, base
                                             fingerprint and step in the safetensors metadata
    gligen/toy/shipped/manifest.json         build config, world version, fingerprints, commits, and the commands
                                             that rebuild both

`python -m gligen.toy build` copies the shipped LDM into the cache instead of pretraining when the asked build
config is the shipped one (`--rebuild` pretrains anyway); `python experiments/ablate_beta.py` uses the shipped
checkpoint when its train config and base are the shipped ones (`--retrain` trains anyway). Rebuilding the world
means replacing these files, in the same commit as the results that use them:

    python -m gligen.toy build --rebuild
    python -m gligen fit --config experiments/configs/toy_base.yaml --config experiments/configs/toy_box.yaml
    python -m gligen.toy ship --cache cache/toy --ckpt runs/toy_box/checkpoints/last.ckpt
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from gligen.checkpoint_file import read_checkpoint, save_safetensors_checkpoint
from gligen.ldm import weights_fingerprint
from gligen.provenance import git_commit
from gligen.toy import world
from gligen.training.rundir import TrainConfig, config_args, config_paths, load_config

SHIPPED_DIR = Path(__file__).parent / "shipped"
MANIFEST = "manifest.json"
CHECKPOINT = "toy_box.safetensors"
# composed in this order (`--config` repeated); its settings are compared as one merged mapping
TRAIN_CONFIG = ["experiments/configs/toy_base.yaml", "experiments/configs/toy_box.yaml"]
SHIPPED_MARKER = "shipped.json"  # in a cache's ldm/: this LDM is a copy of the shipped one, not pretrained here
REBUILD_COMMANDS = [
    "python -m gligen.toy build --rebuild",
    "python -m gligen fit " + " ".join(config_args(TRAIN_CONFIG)),
    "python -m gligen.toy ship --cache cache/toy --ckpt runs/toy_box/checkpoints/last.ckpt",
]


def manifest(root: Path | None = None) -> dict | None:
    """The shipped files' record, or None where nothing is shipped (e.g. a package built without them)."""
    path = (root or SHIPPED_DIR) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def shipped_ldm(root: Path | None = None) -> Path:
    return (root or SHIPPED_DIR) / "ldm"


def shipped_checkpoint(root: Path | None = None) -> Path:
    return (root or SHIPPED_DIR) / CHECKPOINT


def is_shipped_copy(ldm: Path) -> bool:
    return (Path(ldm) / SHIPPED_MARKER).exists()


def install_ldm(target: Path, root: Path | None = None) -> Path:
    """Copy the shipped LDM to `target` (a cache's ldm/), marked as a copy; its fingerprint is the shipped one."""
    target = Path(target)
    if target.exists():  # no model_index.json there (build() checks): a pretraining killed half-way
        shutil.rmtree(target)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(shipped_ldm(root), partial)
    (partial / SHIPPED_MARKER).write_text(json.dumps({"source": str(shipped_ldm(root)),
                                                      "fingerprint": manifest(root)["ldm"]["fingerprint"]}))
    partial.rename(target)  # a kill mid-copy leaves no half LDM where build() looks
    return target


def reference_checkpoint(train_config: TrainConfig, base: str | Path, root: Path | None = None) -> Path | None:
    """The shipped checkpoint when it is what training `train_config` (one file, or files composed in order) on
    `base` would give: same settings (the parsed, merged YAML, so comments and how the settings are split over
    files do not matter) and a base with the fingerprint it was trained on; else None."""
    record = manifest(root)
    if record is None or not shipped_checkpoint(root).exists():
        return None
    settings = load_config(train_config)
    if settings != record["checkpoint"]["train_settings"]:
        return None
    if weights_fingerprint(str(base)) != record["checkpoint"]["base_fingerprint"]:
        return None
    return shipped_checkpoint(root)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def ship(cache: str | Path, ckpt: str | Path, train_config: TrainConfig = TRAIN_CONFIG, root: Path | None = None,
         trained_at: str | None = None) -> dict:
    """Replace the shipped files by the cache's LDM and `ckpt` (trained by `train_config` on that LDM)."""
    cache, root = Path(cache), Path(root or SHIPPED_DIR)
    build_record = json.loads((cache / "build_config.json").read_text())
    ldm = cache / "ldm"
    fingerprint = weights_fingerprint(str(ldm))
    checkpoint = read_checkpoint(ckpt)
    trained_on = checkpoint.get("gligen", {}).get("base_fingerprint")
    if trained_on != fingerprint:
        raise ValueError(f"{ckpt} was trained on a base with fingerprint {trained_on}, {ldm} has {fingerprint}: "
                         "ship a checkpoint trained on this cache's LDM")
    if build_record.get("world_version") != world.WORLD_VERSION:
        raise ValueError(f"{cache} was built by toy world version {build_record.get('world_version')}, this code "
                         f"draws version {world.WORLD_VERSION}")
    shutil.rmtree(root / "ldm", ignore_errors=True)
    shutil.copytree(ldm, root / "ldm", ignore=shutil.ignore_patterns(SHIPPED_MARKER))
    save_safetensors_checkpoint(checkpoint, root / CHECKPOINT)
    pretrain_record = json.loads((ldm / "toy_pretrain.json").read_text())
    record = {
        "world_version": world.WORLD_VERSION,
        "build_config": {k: v for k, v in build_record.items() if k != "world_version"},
        "ldm": {"dir": "ldm", "fingerprint": fingerprint, "pretrain_seconds": pretrain_record.get("seconds"),
                "built_from_shipped_copy": is_shipped_copy(ldm)},
        "checkpoint": {"file": CHECKPOINT, "sha256": _sha256(root / CHECKPOINT),
                       "train_config": [str(p) for p in config_paths(train_config)],
                       "train_settings": load_config(train_config),
                       "global_step": checkpoint.get("global_step"), "base_fingerprint": trained_on,
                       "trained_at_commit": trained_at or git_commit()},
        "shipped_at_commit": git_commit(),
        "rebuild": REBUILD_COMMANDS,
    }
    (root / MANIFEST).write_text(json.dumps(record, indent=1) + "\n")
    return record
