"""Grounding modalities side by side: each modality's own metric with full grounding (tau = 1) vs the base LDM (tau = 0).

    python experiments/ablate_modality.py                     # toy world: builds / trains what is missing, then scores
    python experiments/ablate_modality.py --modalities box image --seeds 0 1 --num-images 100

For every modality in {box, keypoint, image, text_image}: its train config (default experiments/configs/toy_<m>.yaml)
is trained when its checkpoint is missing (gligen.cli.fit_from_config), then images are generated from the same
layouts and seeds with tau = 1 (grounded) and tau = 0 (the frozen base LDM: no grounding at any step), and scored with
the modality's metric (gligen.evaluation.modality_metrics): box AP50 of the detector vs the boxes; keypoint PCK@0.1
and OKS AP of the pose read-back vs the persons; image / text_image entity AP50, the class to find in each box being
the class of its reference image.

Writes <out>/metrics.csv (one row per modality x tau x seed, with git commit and config hash), summary.md (mean +- std
per modality and tau, and the command), modalities.png (bar plots of each modality's primary and placement metrics),
sample grids samples_<modality>_tau<tau>.png (seed seeds[0], layout drawn: boxes, keypoints, skeletons) and TensorBoard
events in <out>/tensorboard.
"""

import argparse
import importlib
import json
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import yaml

from gligen.cli import fit_from_config
from gligen.evaluation import MODALITIES, generate, load_layouts, modality_metrics, reconstruct
from gligen.module import GLIGENModule
from gligen.reporting import command_line
from gligen.results import config_hash, git_commit, mean_std_table, write_csv
from gligen.rundir import is_trained
from gligen.sampling import tau_schedule
from gligen.visualize import layouts_grid

DEFAULTS = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "ablate_modality.yaml"
# the metric each modality is ranked by, and the ones it reports
PRIMARY = {"box": "ap50", "keypoint": "pck", "image": "entity_ap50", "text_image": "entity_ap50"}
# placement alone, what the grounding tokens control whatever the base draws (class = colour; persons class-agnostic)
PLACEMENT = {"box": "coarse_ap50", "keypoint": "person_ap50", "image": "entity_coarse_ap50",
             "text_image": "entity_coarse_ap50"}
REPORTED = {"box": ["ap", "ap50", "ap75", "miou", "coarse_ap50"],
            "keypoint": ["pck", "oks_ap", "oks_ap50", "oks_ap75", "person_ap50", "person_miou"],
            "image": ["entity_ap", "entity_ap50", "entity_ap75", "entity_miou", "entity_coarse_ap50"],
            "text_image": ["entity_ap", "entity_ap50", "entity_ap75", "entity_miou", "entity_coarse_ap50"]}


def parse_args(argv=None) -> dict:
    config = yaml.safe_load(DEFAULTS.read_text())
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML overriding experiments/configs/ablate_modality.yaml")
    for key in ("pretrained", "sampler", "detector", "pose_detector", "out", "toy_cache", "toy_config"):
        parser.add_argument("--" + key.replace("_", "-"), dest=key)
    for key in ("num_images", "steps", "batch_size", "resolution", "grid_size"):
        parser.add_argument("--" + key.replace("_", "-"), dest=key, type=int)
    parser.add_argument("--guidance", type=float)
    parser.add_argument("--modalities", nargs="+", choices=MODALITIES)
    parser.add_argument("--taus", type=float, nargs="+")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--train-config", nargs=2, action="append", metavar=("MODALITY", "YAML"), dest="train_config")
    parser.add_argument("--ckpt", nargs=2, action="append", metavar=("MODALITY", "CKPT"), dest="ckpt")
    args = parser.parse_args(argv)
    if args.config:
        config.update(yaml.safe_load(Path(args.config).read_text()) or {})
    for key, value in vars(args).items():
        if key in ("config", "train_config", "ckpt") or value is None:
            continue
        config[key] = value
    config["train_configs"] = {**(config.get("train_configs") or {}), **dict(args.train_config or [])}
    config["ckpts"] = {**(config.get("ckpts") or {}), **dict(args.ckpt or [])}
    return config


def checkpoint_for(modality: str, config: dict) -> str:
    """The modality's checkpoint: given, found in its run_dir, or trained now."""
    if config["ckpts"].get(modality):
        return str(config["ckpts"][modality])
    train_config = config["train_configs"].get(modality)
    if not train_config or not Path(train_config).exists():
        raise SystemExit(f"{modality}: no checkpoint and no train config ({train_config!r}); pass --ckpt {modality} "
                         f"<file> or --train-config {modality} <yaml>")
    run_dir = (yaml.safe_load(Path(train_config).read_text()) or {}).get("run_dir")
    last = Path(run_dir) / "checkpoints" / "last.ckpt" if run_dir else None
    if last is not None and last.exists() and is_trained(train_config):
        return str(last)
    # none yet, or half-trained (a run cut short): fit resumes it to its max_steps; never scored half-way
    print(f"{modality}: training {train_config}" + (" (resuming a half-trained run)" if last and last.exists() else ""))
    return str(fit_from_config(train_config))


def pose_detector(spec: str):
    if spec in (None, "toy"):
        return None  # modality_metrics' default: the toy read-back
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def box_detector(spec: str):
    if spec in (None, "toy"):
        return None
    from gligen.metrics.grounding import TransformersDetector

    return TransformersDetector(spec)


def modality_layouts(modality: str, config: dict, toy: bool) -> tuple[list[dict], list[np.ndarray]]:
    """The evaluation layouts of a modality and their real images."""
    if toy:
        from gligen.toy.evaluate import toy_layouts

        return toy_layouts(modality, config["num_images"], config["resolution"])
    shards = (config.get("val_shards") or {}).get(modality)
    if not shards:
        raise SystemExit(f"{modality}: val_shards.{modality} is required outside the toy world")
    return load_layouts(shards, config["resolution"], config["num_images"],
                        entity_images=modality in ("image", "text_image"))


def evaluate_modality(modality: str, config: dict, toy: bool
                      ) -> tuple[list[dict], dict[float, list[np.ndarray]], list[dict], dict]:
    """Rows (tau x seed), sample grids, layouts, and the VAE ceiling: the same metrics on VAE reconstructions of the
    real images (no model in this latent space can score higher; a low ceiling means the autoencoder, not
    grounding, caps the metric)."""
    ckpt = checkpoint_for(modality, config)
    module = GLIGENModule.from_checkpoint(ckpt, config.get("pretrained"))
    if module.hparams.modality != modality:
        raise SystemExit(f"{ckpt}: a {module.hparams.modality!r} checkpoint, listed for {modality!r}")
    if torch.cuda.is_available():
        module = module.cuda()
    layouts, references = modality_layouts(modality, config, toy)
    detector = pose_detector(config["pose_detector"]) if modality == "keypoint" else box_detector(config["detector"])
    provenance = {"git_commit": git_commit(), "num_images": len(layouts), "ckpt": ckpt,
                  "config_hash": config_hash({**config, "modality": modality, "train_config": _text(
                      config["train_configs"].get(modality))})}
    rows, grids = [], {}
    for tau in config["taus"]:
        for seed in config["seeds"]:
            images = generate(module.ldm, layouts, tau_schedule(config["steps"], tau), seed=seed,
                              sampler=config["sampler"], steps=config["steps"], guidance=config["guidance"],
                              batch_size=config["batch_size"], progress=False,
                              max_objects=module.hparams.max_objects, modality=modality)
            metrics = modality_metrics(images, layouts, modality, detector)
            placement = PLACEMENT[modality]
            row = {"modality": modality, "tau": tau, "seed": seed, "metric": PRIMARY[modality],
                   "value": metrics[PRIMARY[modality]], "placement_metric": placement,
                   "placement": metrics.get(placement, float("nan")), **metrics, **provenance}
            rows.append(row)
            if seed == config["seeds"][0]:
                grids[tau] = images[: config["grid_size"]]
            print(f"{modality} tau={tau:g} seed={seed}: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
    metrics = modality_metrics(reconstruct(module.ldm, references), layouts, modality, detector)
    ceiling = {"modality": modality, "metric": PRIMARY[modality], "value": metrics[PRIMARY[modality]],
               "placement_metric": PLACEMENT[modality], "placement": metrics.get(PLACEMENT[modality], float("nan")),
               **metrics, **provenance}
    print(f"{modality} VAE reconstructions: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
    return rows, grids, layouts, ceiling


def _text(path) -> str | None:
    return Path(path).read_text() if path and Path(path).exists() else None


def bar_plot(rows: list[dict], path: Path) -> None:
    """Per modality, mean +- std over seeds, one bar per tau: the primary metric (left) and placement (right)."""
    modalities = list(dict.fromkeys(r["modality"] for r in rows))
    taus = sorted({r["tau"] for r in rows})
    width = 0.8 / len(taus)
    fig, axes = plt.subplots(1, 2, figsize=(3.6 * len(modalities) + 2, 4))
    for ax, key, names, title in ((axes[0], "value", PRIMARY, "class / joint aware"),
                                  (axes[1], "placement", PLACEMENT, "placement only")):
        for k, tau in enumerate(taus):
            means, stds = [], []
            for m in modalities:
                values = [r[key] for r in rows if r["modality"] == m and r["tau"] == tau]
                means.append(np.mean(values))
                stds.append(np.std(values, ddof=1) if len(values) > 1 else 0.0)
            label = "base LDM (tau=0)" if tau == 0 else f"GLIGEN (tau={tau:g})"
            ax.bar(np.arange(len(modalities)) + (k - (len(taus) - 1) / 2) * width, means, width, yerr=stds,
                   capsize=3, label=label)
        ax.set_xticks(np.arange(len(modalities)), [f"{m}\n({names[m]})" for m in modalities], fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("grounding metric")
        ax.set_title(f"GLIGEN vs base LDM: {title}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(out: Path, rows: list[dict], grids: dict, layouts: dict, config: dict,
                  ceilings: list[dict]) -> None:
    from torch.utils.tensorboard import SummaryWriter
    from torchvision.utils import save_image

    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "metrics.csv")
    write_csv(ceilings, out / "vae_ceiling.csv")
    (out / "config.json").write_text(json.dumps(config, indent=1, default=str))
    bar_plot(rows, out / "modalities.png")
    grid_images = {}
    for (modality, tau), images in grids.items():
        grid = layouts_grid(images, layouts[modality])
        grid_images[(modality, tau)] = grid
        save_image(grid.float() / 255, out / f"samples_{modality}_tau{tau:g}.png")
    first = rows[0]
    summary = ["# Grounding modalities: each modality's own metric, GLIGEN (tau = 1) vs the base LDM (tau = 0)", "",
               f"Command: `{command_line()}`", "",
               (f"git commit `{first['git_commit']}`, seeds {config['seeds']}, {config['num_images']} layouts per cell, "
               f"sampler {config['sampler']}, {config['steps']} steps, guidance {config['guidance']}. "
               "tau = 0 is the frozen base LDM on the same layouts and seeds."), "",
               ("Primary metric (class / joint aware) and placement metric (class = colour; persons class-agnostic) "
                "per modality, mean ± std over seeds:"), "",
               mean_std_table([{**r, "cell": f"{r['modality']} ({r['metric']} / {r['placement_metric']}) "
                                             f"tau={r['tau']:g}"} for r in rows], "cell", ["value", "placement"]),
               "", ("VAE ceiling: the same metrics on VAE reconstructions of the real images of the same layouts "
                    "(what the latent space can carry; no model on this VAE can score higher):"), "",
               "| modality | primary | placement |", "|---|---|---|",
               *[f"| {c['modality']} | {c['metric']} {c['value']:.3f} | {c['placement_metric']} {c['placement']:.3f} |"
                 for c in ceilings], ""]
    for modality in dict.fromkeys(r["modality"] for r in rows):
        mine = [r for r in rows if r["modality"] == modality]
        metrics = [m for m in REPORTED[modality] if m in mine[0]]
        summary += [f"## {modality}", "", f"checkpoint `{mine[0]['ckpt']}`, config hash `{mine[0]['config_hash']}`",
                    "", mean_std_table(mine, "tau", metrics), "",
                    "Samples: " + ", ".join(f"samples_{modality}_tau{t:g}.png" for t in config["taus"]), ""]
    summary += [("Files: metrics.csv (every row), vae_ceiling.csv, modalities.png, samples_*.png (seed "
                f"{config['seeds'][0]}, layout drawn), tensorboard/ (`tensorboard --logdir {out / 'tensorboard'}`)."),
                ""]
    (out / "summary.md").write_text("\n".join(summary))
    log_dir = out / "tensorboard"
    if log_dir.exists():
        shutil.rmtree(log_dir)
    with SummaryWriter(str(log_dir)) as writer:
        for (modality, tau), grid in grid_images.items():
            writer.add_image(f"samples/{modality}_tau_{tau:g}", grid, 0)
        for row in rows:
            metrics = {f"hp/{m}": float(row[m]) for m in [*REPORTED[row["modality"]], "value"] if m in row}
            writer.add_hparams({"modality": row["modality"], "tau": float(row["tau"]), "seed": int(row["seed"])},
                               metrics, run_name=f"{row['modality']}_tau{row['tau']:g}_seed{row['seed']}")


def main(argv=None) -> None:
    config = parse_args(argv)
    torch.manual_seed(0)
    toy = config.get("pretrained") is None and not config.get("val_shards")
    if toy:
        from gligen.toy.build import ToyBuildConfig, build

        build(config["toy_cache"], ToyBuildConfig.from_yaml(config["toy_config"]))
    rows, grids, layouts, ceilings = [], {}, {}, []
    for modality in config["modalities"]:
        modality_rows, modality_grids, layouts[modality], ceiling = evaluate_modality(modality, config, toy)
        rows += modality_rows
        ceilings.append(ceiling)
        grids.update({(modality, tau): images for tau, images in modality_grids.items()})
    write_results(Path(config["out"]), rows, grids, layouts, config, ceilings)
    print(f"wrote {config['out']}")
