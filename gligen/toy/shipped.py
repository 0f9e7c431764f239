"""The toy world's shipped weights: the pretrained base LDM and the reference box-grounded GLIGEN checkpoint behind
the committed results/ablate_beta, inside the package, so the default experiment needs no pretraining.

    gligen/toy/shipped/ldm/                  the base LDM as `python -m gligen.toy build` pretrains it (a diffusers
                                             Stable Diffusion directory with clip/, safetensors weights)
    gligen/toy/shipped/toy_box.safetensors   the grounding layers (fusers + position_net) trained by
                                             experiments/configs/toy_base.yaml + toy_box.yaml on that base;
                                             hyper-parameters, base fingerprint and step in the safetensors metadata
    gligen/toy/shipped/toy_box_seed<s>.safetensors
                                             the same training with seed_everything s (1, 2): ablate_beta's default
                                             train_seeds [0, 1, 2] sweep three models without training any
    gligen/toy/shipped/manifest.json         build config, world version, fingerprints, commits, and the commands
                                             that rebuild them

`python -m gligen.toy build` copies the shipped LDM into the cache instead of pretraining when the asked build
config is the shipped one (`--rebuild` pretrains anyway); `python experiments/ablate_beta.py` uses the shipped
checkpoint when its train config and base are the shipped ones (`--retrain` trains anyway). Rebuilding the world
means replacing these files, in the same commit as the results that use them:

    python -m gligen.toy build --rebuild
    python -m gligen fit --config experiments/configs/toy_base.yaml --config experiments/configs/toy_box.yaml
    python -m gligen.toy ship --cache cache/toy --ckpt runs/toy_box/checkpoints/last.ckpt
    python -m gligen fit <the same two configs> --seed_everything 1 --run_dir runs/toy_box_seed1   (and seed 2)
    python -m gligen.toy ship-seed --ckpt runs/toy_box_seed1/checkpoints/last.ckpt                (and seed 2)
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import yaml

from gligen.checkpoint_file import read_checkpoint, save_safetensors_checkpoint, weights_hash
from gligen.ldm import weights_fingerprint
from gligen.provenance import git_commit
from gligen.toy import world
from gligen.training.rundir import TrainConfig, config_args, config_paths, load_config, own_seed

SHIPPED_DIR = Path(__file__).parent / "shipped"
MANIFEST = "manifest.json"
CHECKPOINT = "toy_box.safetensors"  # the train config's own seed (seed_everything 0)
SEED_CHECKPOINT = "toy_box_seed{seed}.safetensors"  # the same training with other seeds: replication
# composed in this order (`--config` repeated); its settings are compared as one merged mapping
TRAIN_CONFIG = ["experiments/configs/toy_base.yaml", "experiments/configs/toy_box.yaml"]
SHIPPED_MARKER = "shipped.json"  # in a cache's ldm/: this LDM is a copy of the shipped one, not pretrained here
SHIPPED_SEEDS = (1, 2)  # besides the own seed: ablate_beta's default train_seeds [0, 1, 2] need no training
REBUILD_COMMANDS = [
    "python -m gligen.toy build --rebuild",
    "python -m gligen fit " + " ".join(config_args(TRAIN_CONFIG)),
    "python -m gligen.toy ship --cache cache/toy --ckpt runs/toy_box/checkpoints/last.ckpt",
    *[f"python -m gligen fit {' '.join(config_args(TRAIN_CONFIG))} --seed_everything {seed} --run_dir "
      f"runs/toy_box_seed{seed}" for seed in SHIPPED_SEEDS],
    *[f"python -m gligen.toy ship-seed --ckpt runs/toy_box_seed{seed}/checkpoints/last.ckpt" for seed in SHIPPED_SEEDS],
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


def reference_checkpoint(train_config: TrainConfig, base: str | Path, root: Path | None = None,
                         seed: int | None = None) -> Path | None:
    """The shipped checkpoint when it is what training `train_config` (one file, or files composed in order) on
    `base` with training seed `seed` (None: the config's own) would give: same settings (the parsed, merged YAML,
    so comments and how the settings are split over files do not matter), a base with the fingerprint it was
    trained on, and that seed shipped; else None."""
    record = manifest(root)
    if record is None or not shipped_checkpoint(root).exists():
        return None
    settings = load_config(train_config)
    if settings != record["checkpoint"]["train_settings"]:
        return None
    if weights_fingerprint(str(base)) != record["checkpoint"]["base_fingerprint"]:
        return None
    if seed is None or int(seed) == own_seed(settings):
        return shipped_checkpoint(root)
    entry = (record.get("seed_checkpoints") or {}).get(str(int(seed)))
    path = Path(root or SHIPPED_DIR) / entry["file"] if entry else None
    return path if path is not None and path.exists() else None


def ship_seed(ckpt: str | Path, root: Path | None = None) -> dict:
    """Ship `ckpt`, the shipped reference's training with another seed (`python -m gligen fit <the train config>
    --seed_everything S --run_dir runs/toy_box_seedS`), next to it. Refused unless it is that: a training record
    naming its seed, another seed than the reference's, the same base, hyper-parameters and step."""
    root = Path(root or SHIPPED_DIR)
    record = manifest(root)
    if record is None:
        raise ValueError(f"{root}: nothing shipped yet; ship the reference checkpoint first (python -m gligen.toy "
                         "ship)")
    checkpoint, reference = read_checkpoint(ckpt), read_checkpoint(shipped_checkpoint(root))
    gligen = checkpoint.get("gligen") or {}
    training = gligen.get("training") or {}
    seed = (yaml.safe_load(training.get("config") or "") or {}).get("seed_everything")
    own = own_seed(record["checkpoint"]["train_settings"])
    problems = []
    if seed is None:
        problems.append("it has no training record naming its seed (train it with python -m gligen fit)")
    elif int(seed) == own:
        problems.append(f"seed {seed} is the reference checkpoint's own (replace that with python -m gligen.toy ship)")
    if gligen.get("base_fingerprint") != record["ldm"]["fingerprint"]:
        problems.append(f"base {gligen.get('base_fingerprint')}, the shipped LDM is {record['ldm']['fingerprint']}")
    mine, theirs = ({k: v for k, v in c.get("hyper_parameters", {}).items() if k != "pretrained"}
                    for c in (checkpoint, reference))
    if mine != theirs:
        differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        problems.append(f"hyper-parameters differ: {differ}")
    if checkpoint.get("global_step") != reference.get("global_step"):
        problems.append(f"step {checkpoint.get('global_step')}, the reference's {reference.get('global_step')}")
    if problems:
        raise ValueError(f"{ckpt} is not the shipped reference trained with another seed: " + "; ".join(problems))
    name = SEED_CHECKPOINT.format(seed=int(seed))
    save_safetensors_checkpoint(checkpoint, root / name)
    record.setdefault("seed_checkpoints", {})[str(int(seed))] = {
        "file": name, "sha256": _sha256(root / name), "global_step": checkpoint.get("global_step"),
        "weights_hash": weights_hash(checkpoint["state_dict"]),
        "trained_at_commits": training.get("commits"), "train_config_hash": training.get("config_hash"),
        "train_shards_fingerprint": training.get("train_shards_fingerprint")}
    record["rebuild"] = REBUILD_COMMANDS
    (root / MANIFEST).write_text(json.dumps(record, indent=1) + "\n")
    return record


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
    for stale in root.glob(SEED_CHECKPOINT.format(seed="*")):  # other seeds of the replaced training
        stale.unlink()
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
