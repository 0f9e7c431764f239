"""Grounding modalities side by side: each modality's own metric with full grounding (tau = 1) vs the base LDM
(tau = 0).

    python experiments/ablate_modality.py                     # toy world: builds / trains what is missing, then scores
    python experiments/ablate_modality.py --modalities [box,image] --seeds [0,1] --num_images 100
    python experiments/ablate_modality.py --train_configs.box my_box.yaml --ckpts.image runs/x/checkpoints/last.ckpt

Settings: ModalityAblationConfig (gligen/experiments/config.py), defaults experiments/configs/ablate_modality.yaml;
`--config` (repeatable), `--print_config`, `--help`.

For every modality in {box, keypoint, image, text_image}: its train config (default experiments/configs/toy_base.yaml
+ toy_<m>.yaml) is trained when its checkpoint is missing (gligen.training.cli.fit_from_config), then images are
generated from the same layouts and seeds with tau = 1 (grounded) and tau = 0 (the frozen base LDM: no grounding at
any step), and scored with the modality's metric (gligen.modalities, Modality.metrics): box AP50 of the detector vs
the boxes; keypoint PCK@0.1 and OKS AP of the pose read-back vs the persons; image / text_image entity AP50, the class
to find in each box being the class of its reference image.

Writes <out>/metrics.csv (one row per modality x tau x seed, with git commit and config hash), summary.md (mean +- std
per modality and tau, and the command), modalities.png (bar plots of each modality's primary and placement metrics),
sample grids samples_<modality>_tau<tau>.png (seed seeds[0], layout drawn: boxes, keypoints, skeletons) and TensorBoard
events in <out>/tensorboard.
"""

import json
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from gligen.evaluation.generate import generate, load_layouts, reconstruct
from gligen.evaluation.reporting import command_line
from gligen.evaluation.results import mean_std_table, write_csv
from gligen.evaluation.visualize import layouts_grid
from gligen.experiments.config import ModalityAblationConfig, parse, to_dict
from gligen.modalities import get_modality, modality_names
from gligen.module import GLIGENModule
from gligen.provenance import config_hash, git_commit
from gligen.sampling import tau_schedule
from gligen.toy.build import ensure_toy_world
from gligen.toy.evaluate import toy_layouts
from gligen.training.cli import fit_from_config
from gligen.training.rundir import config_paths, describe_config, is_trained, load_config


def parse_args(argv=None) -> dict:
    """The settings (ModalityAblationConfig) as the mapping the functions here read. The older pair flags still work:
    `--ckpt box my.ckpt` is `--ckpts.box my.ckpt`, `--train-config box my.yaml` is `--train_configs.box my.yaml`."""
    config = parse(ModalityAblationConfig, argv, name="ablate_modality", description=__doc__,
                   pairs={"ckpt": "ckpts", "train_config": "train_configs"})
    unknown = sorted(set(config.modalities) - set(modality_names()))
    if unknown:
        raise SystemExit(f"ablate_modality: unknown modalities {unknown} (known: {list(modality_names())})")
    return to_dict(config)


def checkpoint_for(modality: str, config: dict) -> str:
    """The modality's checkpoint: given, found in its run_dir, or trained now."""
    if config["ckpts"].get(modality):
        return str(config["ckpts"][modality])
    train_config = config["train_configs"].get(modality)
    if not train_config or not all(path.exists() for path in config_paths(train_config)):
        raise SystemExit(f"{modality}: no checkpoint and no train config ({train_config!r}); pass --ckpts.{modality} "
                         f"<file> or --train_configs.{modality} <yaml>")
    run_dir = load_config(train_config).get("run_dir")
    last = Path(run_dir) / "checkpoints" / "last.ckpt" if run_dir else None
    if last is not None and last.exists() and is_trained(train_config):
        return str(last)
    # none yet, or half-trained (a run cut short): fit resumes it to its max_steps; never scored half-way
    resuming = " (resuming a half-trained run)" if last and last.exists() else ""
    print(f"{modality}: training {describe_config(train_config)}{resuming}")
    return str(fit_from_config(train_config))


def modality_layouts(modality: str, config: dict, toy: bool) -> tuple[list[dict], list[np.ndarray]]:
    """The evaluation layouts of a modality and their real images."""
    if toy:
        return toy_layouts(get_modality(modality).family, config["num_images"], config["resolution"])
    shards = (config.get("val_shards") or {}).get(modality)
    if not shards:
        raise SystemExit(f"{modality}: val_shards.{modality} is required outside the toy world")
    return load_layouts(shards, config["resolution"], config["num_images"],
                        entity_images=get_modality(modality).entity_images)


def evaluate_modality(modality: str, config: dict, toy: bool
                      ) -> tuple[list[dict], dict[float, list[np.ndarray]], list[dict], dict]:
    """Rows (tau x seed), sample grids, layouts, and the VAE ceiling: the same metrics on VAE reconstructions of the
    real images (no model in this latent space can score higher; a low ceiling means the autoencoder, not
    grounding, caps the metric)."""
    ckpt = checkpoint_for(modality, config)
    module = GLIGENModule.from_checkpoint(ckpt, config.get("pretrained"))
    if module.modality is not get_modality(modality):
        raise SystemExit(f"{ckpt}: a {module.modality.name!r} checkpoint, listed for {modality!r}")
    if torch.cuda.is_available():
        module = module.cuda()
    layouts, references = modality_layouts(modality, config, toy)
    detector = module.modality.detector(config)
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
            metrics = module.modality.metrics(images, layouts, detector)
            row = {"modality": modality, "tau": tau, "seed": seed, **headline(module.modality, metrics),
                   **metrics, **provenance}
            rows.append(row)
            if seed == config["seeds"][0]:
                grids[tau] = images[: config["grid_size"]]
            print(f"{modality} tau={tau:g} seed={seed}: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
    metrics = module.modality.metrics(reconstruct(module.ldm, references), layouts, detector)
    ceiling = {"modality": modality, **headline(module.modality, metrics), **metrics, **provenance}
    print(f"{modality} VAE reconstructions: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
    return rows, grids, layouts, ceiling


def headline(modality, metrics: dict) -> dict:
    """The modality's primary (class / joint aware) and placement metric, as the table's columns."""
    return {"metric": modality.primary_metric, "value": metrics[modality.primary_metric],
            "placement_metric": modality.placement_metric,
            "placement": metrics.get(modality.placement_metric, float("nan"))}


def _text(train_config) -> str | None:
    """The text of a train config's files (composed: concatenated in order), for the config hash."""
    if not train_config or not all(p.exists() for p in config_paths(train_config)):
        return None
    return "".join(p.read_text() for p in config_paths(train_config))


def bar_plot(rows: list[dict], path: Path) -> None:
    """Per modality, mean +- std over seeds, one bar per tau: the primary metric (left) and placement (right)."""
    modalities = list(dict.fromkeys(r["modality"] for r in rows))
    taus = sorted({r["tau"] for r in rows})
    width = 0.8 / len(taus)
    fig, axes = plt.subplots(1, 2, figsize=(3.6 * len(modalities) + 2, 4))
    for ax, key, attribute, title in ((axes[0], "value", "primary_metric", "class / joint aware"),
                                      (axes[1], "placement", "placement_metric", "placement only")):
        for k, tau in enumerate(taus):
            means, stds = [], []
            for m in modalities:
                values = [r[key] for r in rows if r["modality"] == m and r["tau"] == tau]
                means.append(np.mean(values))
                stds.append(np.std(values, ddof=1) if len(values) > 1 else 0.0)
            label = "base LDM (tau=0)" if tau == 0 else f"GLIGEN (tau={tau:g})"
            ax.bar(np.arange(len(modalities)) + (k - (len(taus) - 1) / 2) * width, means, width, yerr=stds,
                   capsize=3, label=label)
        labels = [f"{m}\n({getattr(get_modality(m), attribute)})" for m in modalities]
        ax.set_xticks(np.arange(len(modalities)), labels, fontsize=8)
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
        metrics = [m for m in get_modality(modality).metric_names if m in mine[0]]
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
            names = [*get_modality(row["modality"]).metric_names, "value"]
            metrics = {f"hp/{m}": float(row[m]) for m in names if m in row}
            writer.add_hparams({"modality": row["modality"], "tau": float(row["tau"]), "seed": int(row["seed"])},
                               metrics, run_name=f"{row['modality']}_tau{row['tau']:g}_seed{row['seed']}")


def main(argv=None) -> None:
    config = parse_args(argv)
    torch.manual_seed(0)
    locations = [config.get("pretrained"), config.get("val_shards")]  # gligen.toy.build.is_toy_world decides
    toy = ensure_toy_world(config["toy_cache"], config["toy_config"], locations) is not None
    rows, grids, layouts, ceilings = [], {}, {}, []
    for modality in config["modalities"]:
        modality_rows, modality_grids, layouts[modality], ceiling = evaluate_modality(modality, config, toy)
        rows += modality_rows
        ceilings.append(ceiling)
        grids.update({(modality, tau): images for tau, images in modality_grids.items()})
    write_results(Path(config["out"]), rows, grids, layouts, config, ceilings)
    print(f"wrote {config['out']}")
