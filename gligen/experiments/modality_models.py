"""One model of the modality ablation (experiments/ablate_modality.py): its checkpoint (given, found trained, shipped
or trained now), its rows (tau x sampling seed, scored with the modality's own metrics), sample grids and VAE ceiling,
kept in <out>/models/<modality>_train<seed>/ so that a later run, in another session or a clone without the
(uncommitted) checkpoints, reuses them instead of training and scoring again."""

import json
import time
from pathlib import Path

import numpy as np
import torch

from gligen.checkpoint_file import checkpoint_identity
from gligen.evaluation.generate import generate, load_layouts, reconstruct, score
from gligen.evaluation.results import RECORDS, checkpoint_columns, read_rows, write_rows
from gligen.experiments.provenance import run_columns
from gligen.ldm import weights_fingerprint
from gligen.metrics.detectors import make_image_scorer
from gligen.modalities import get_modality
from gligen.module import GLIGENModule
from gligen.provenance import config_hash, git_commit, portable_path
from gligen.sampling import tau_schedule
from gligen.toy.evaluate import toy_layouts
from gligen.toy.shipped import reference_checkpoint
from gligen.training.cli import fit_from_config
from gligen.training.rundir import config_paths, describe_config, is_trained, load_config, seed_run


def checkpoint_for(modality: str, config: dict, train_seed: int | None = None) -> str:
    """The modality's checkpoint for one training seed (None: the train config's own): given, found finished in
    its run_dir (<run_dir>_seed<s> for another seed, gligen.training.rundir.seed_run), or trained now."""
    if config["ckpts"].get(modality):
        return str(config["ckpts"][modality])
    train_config = config["train_configs"].get(modality)
    if not train_config or not all(path.exists() for path in config_paths(train_config)):
        raise SystemExit(f"{modality}: no checkpoint and no train config ({train_config!r}); pass --ckpts.{modality} "
                         f"<file> or --train_configs.{modality} <yaml>")
    overrides, run_dir = seed_run(train_config, train_seed)
    last = run_dir / "checkpoints" / "last.ckpt" if run_dir else None
    if last is not None and last.exists() and is_trained(train_config, overrides):
        return str(last)
    base = _pretrained(train_config)
    shipped = None if config.get("retrain") or not base else reference_checkpoint(train_config, base, seed=train_seed)
    if shipped is not None:  # the package ships this very training (toy box, seeds 0-2): nothing to train
        return portable_path(shipped)
    # none yet, or half-trained (a run cut short): fit resumes it to its max_steps; never scored half-way
    resuming = " (resuming a half-trained run)" if last and last.exists() else ""
    seed = f", training seed {train_seed}" if overrides else ""
    print(f"{modality}: training {describe_config(train_config)}{seed}{resuming}")
    return str(fit_from_config(train_config, *overrides))


def modality_layouts(modality: str, config: dict, toy: bool) -> tuple[list[dict], list[np.ndarray]]:
    """The evaluation layouts of a modality and their real images."""
    if toy:
        return toy_layouts(get_modality(modality).family, config["num_images"], config["resolution"])
    shards = (config.get("val_shards") or {}).get(modality)
    if not shards:
        raise SystemExit(f"{modality}: val_shards.{modality} is required outside the toy world")
    return load_layouts(shards, config["resolution"], config["num_images"],
                        entity_images=get_modality(modality).entity_images)


def evaluate_modality(modality: str, config: dict, toy: bool, train_seed: int | None = None
                      ) -> tuple[list[dict], dict[float, list[np.ndarray]], list[dict], list[np.ndarray], GLIGENModule]:
    """Rows (tau x sampling seed) of one trained model (training seed `train_seed`), its sample grids, the layouts
    and their real images, and the model."""
    ckpt = checkpoint_for(modality, config, train_seed)
    module = GLIGENModule.from_checkpoint(ckpt, config.get("pretrained"))
    if module.modality is not get_modality(modality):
        raise SystemExit(f"{ckpt}: a {module.modality.name!r} checkpoint, listed for {modality!r}")
    if torch.cuda.is_available():
        module = module.cuda()
    layouts, references = modality_layouts(modality, config, toy)
    detector = module.modality.detector(config)
    image_scorer = make_image_scorer(config.get("image_scorer"))
    provenance = {"git_commit": git_commit(), "num_images": len(layouts),
                  "config_hash": config_hash(model_settings(modality, config, train_seed)),
                  "train_seed": 0 if train_seed is None else train_seed,
                  **checkpoint_columns(ckpt, checkpoint_identity(ckpt))}
    rows, grids, start = [], {}, time.perf_counter()
    for tau in config["taus"]:
        for seed in config["seeds"]:
            images = generate(module.ldm, layouts, tau_schedule(config["steps"], tau), seed=seed,
                              sampler=config["sampler"], steps=config["steps"], guidance=config["guidance"],
                              batch_size=config["batch_size"], progress=False,
                              max_objects=module.hparams.max_objects, modality=modality)
            metrics, records = score(module.modality, images, layouts, detector, image_scorer)
            records.alias("value", module.modality.primary_metric)
            records.alias("placement", module.modality.placement_metric)
            row = {"modality": modality, "tau": tau, "seed": seed, **headline(module.modality, metrics),
                   **metrics, **provenance, RECORDS: records}
            rows.append(row)
            if seed == config["seeds"][0]:
                grids[tau] = images[: config["grid_size"]]
            print(f"{modality} train seed {provenance['train_seed']} tau={tau:g} seed={seed}: "
                  + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
    run = run_columns(time.perf_counter() - start)  # the stage: sampling and scoring this model
    return [{**row, **run} for row in rows], grids, layouts, references, module


def vae_ceiling(modality: str, module: GLIGENModule, config: dict, layouts: list[dict],
                references: list[np.ndarray]) -> dict:
    """The modality's metrics on VAE reconstructions of the real images of its layouts: no model in this latent
    space can score higher; a low ceiling means the autoencoder, not grounding, caps the metric."""
    metrics = module.modality.metrics(reconstruct(module.ldm, references), layouts, module.modality.detector(config))
    print(f"{modality} VAE reconstructions: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
    return {"modality": modality, **headline(module.modality, metrics), **metrics, "git_commit": git_commit(),
            "num_images": len(layouts), "base_fingerprint": module.base_fingerprint}


def headline(modality, metrics: dict) -> dict:
    """The modality's primary (class / joint aware) and placement metric, as the table's columns."""
    return {"metric": modality.primary_metric, "value": metrics[modality.primary_metric],
            "placement_metric": modality.placement_metric,
            "placement": metrics.get(modality.placement_metric, float("nan"))}


# ----- one model's scores, kept: an interrupted or later run (another session, a clone) reuses them ---------------
MODELS = "models"  # <out>/models/<modality>_train<seed>/: that model's rows, sample grids, VAE ceiling, marker
MODEL_DONE = "model_done.json"
RUN_KEYS = ("modalities", "train_seeds", "ckpts", "train_configs", "val_shards", "out")  # not one model's business


def model_settings(modality: str, config: dict, train_seed: int | None) -> dict:
    """What one model's rows depend on (their config_hash): the scoring settings, this modality's checkpoint or
    train config (its text, and the fingerprint of the base it trains on) and the training seed; not which other
    modalities or seeds run beside it, nor where the results go."""
    train_config = config["train_configs"].get(modality)
    base = _pretrained(train_config)
    return {**{k: v for k, v in config.items() if k not in RUN_KEYS}, "modality": modality, "train_seed": train_seed,
            "ckpt": config["ckpts"].get(modality), "train_config": _text(train_config),
            "train_base": weights_fingerprint(str(base)) if base else None,
            "val_shards": (config.get("val_shards") or {}).get(modality)}


def model_dir(config: dict, modality: str, train_seed: int | None) -> Path:
    return Path(config["out"]) / MODELS / f"{modality}_train{0 if train_seed is None else int(train_seed)}"


def model_scored(folder: Path, settings: dict) -> bool:
    """True when `folder` holds this model's finished scores: same settings, and the checkpoint they scored, when
    it is still on disk, has the same weights (a run trained further since is scored again)."""
    marker = folder / MODEL_DONE
    if not marker.exists():
        return False
    done = json.loads(marker.read_text())
    if done.get("config_hash") != config_hash(settings):
        return False
    ckpt = Path(done.get("ckpt") or "")
    return not ckpt.is_file() or checkpoint_identity(ckpt)["weights_hash"] == done.get("weights_hash")


def save_model(folder: Path, rows: list[dict], grids: dict, ceiling: dict, settings: dict) -> None:
    """The model's rows (with layout records), grids and ceiling, then the marker (last: a kill leaves none)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_rows(rows, folder / "metrics.csv")
    for tau, images in grids.items():
        np.save(folder / f"grid_tau{tau:g}.npy", np.stack(images))
    (folder / "vae_ceiling.json").write_text(json.dumps(ceiling, indent=1))
    done = {"config_hash": config_hash(settings), "ckpt": rows[0]["ckpt"], "weights_hash": rows[0]["ckpt_weights_hash"]}
    (folder / MODEL_DONE).write_text(json.dumps(done, indent=1))


def load_model(folder: Path, taus: list[float]) -> tuple[list[dict], dict, dict]:
    """A scored model's rows (as metrics.csv reads back), sample grids per tau and VAE ceiling."""
    grids = {tau: list(np.load(folder / f"grid_tau{tau:g}.npy")) for tau in taus}
    return read_rows(folder / "metrics.csv"), grids, json.loads((folder / "vae_ceiling.json").read_text())


def scored_model(modality: str, config: dict, toy: bool, train_seed: int | None) -> tuple[list[dict], dict, dict]:
    """One model's rows, grids and VAE ceiling: read back when scored before with these settings, else trained
    (when missing) and scored now, and kept in its folder."""
    folder, settings = model_dir(config, modality, train_seed), model_settings(modality, config, train_seed)
    if model_scored(folder, settings):
        print(f"{modality} training seed {0 if train_seed is None else train_seed}: scored before ({folder}); "
              "not redone")
    else:
        rows, grids, layouts, references, module = evaluate_modality(modality, config, toy, train_seed)
        save_model(folder, rows, grids, vae_ceiling(modality, module, config, layouts, references), settings)
    return load_model(folder, config["taus"])


def _pretrained(train_config) -> str | None:
    """The base LDM a train config trains on (model.pretrained; None: no train config)."""
    if not train_config or not all(p.exists() for p in config_paths(train_config)):
        return None
    return (load_config(train_config).get("model") or {}).get("pretrained")


def _text(train_config) -> str | None:
    """The text of a train config's files (composed: concatenated in order), for the config hash."""
    if not train_config or not all(p.exists() for p in config_paths(train_config)):
        return None
    return "".join(p.read_text() for p in config_paths(train_config))
