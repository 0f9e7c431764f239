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

--train_seeds [0,1,2] replicates over training: one model per modality and seed (the config's own seed in its
run_dir, another in <run_dir>_seed<s>), each trained when missing (toy box: the shipped checkpoints of that training,
unless --retrain); the summary's intervals are over those models. Each model's rows, grids and VAE ceiling are kept
in <out>/models/<modality>_train<s>/ with a marker (model_done.json: settings hash, weights hash): a rerun, in a later
session or a clone without the (uncommitted) checkpoints, reuses them instead of training and scoring again.

Writes <out>/metrics.csv (one row per modality x training seed x tau x sampling seed, with git commit, config hash and
the checkpoint's identity: step, weights hash, base, training commits), summary.md (per modality and tau: mean over
training seeds, their std and a 95% bootstrap interval; tau 1 - tau 0 with its interval; metrics at the VAE ceiling
or saturated; the command), modalities.png (bar plots of each modality's primary and placement metrics),
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

from gligen.evaluation import stats
from gligen.evaluation.reporting import command_line, interval_sections, summary_marker
from gligen.evaluation.results import commits, model_table, write_csv, write_rows
from gligen.evaluation.visualize import layouts_grid
from gligen.experiments.config import ModalityAblationConfig, parse, to_dict
from gligen.experiments.modality_models import modality_layouts, scored_model
from gligen.modalities import get_modality, modality_names
from gligen.toy.build import ensure_toy_world


def parse_args(argv=None) -> dict:
    """The settings (ModalityAblationConfig) as the mapping the functions here read. The older pair flags still work:
    `--ckpt box my.ckpt` is `--ckpts.box my.ckpt`, `--train-config box my.yaml` is `--train_configs.box my.yaml`."""
    config = parse(ModalityAblationConfig, argv, name="ablate_modality", description=__doc__,
                   pairs={"ckpt": "ckpts", "train_config": "train_configs"})
    unknown = sorted(set(config.modalities) - set(modality_names()))
    if unknown:
        raise SystemExit(f"ablate_modality: unknown modalities {unknown} (known: {list(modality_names())})")
    return to_dict(config)


def training_seeds(config: dict) -> list[int | None]:
    """The training seeds to replicate over ([None]: one model, the train config's own seed). Given checkpoints
    are one training seed each: they cannot be replicated."""
    seeds = list(dict.fromkeys(int(s) for s in config.get("train_seeds") or [])) or [None]
    given = sorted(m for m in config["modalities"] if config["ckpts"].get(m))
    if given and len(seeds) > 1:
        raise SystemExit(f"--train_seeds trains one model per seed; --ckpts.{given[0]} is one trained model: give "
                         "train configs instead, or one training seed")
    return seeds


def bar_plot(rows: list[dict], path: Path) -> None:
    """Per modality, mean +- std over seeds, one bar per tau: the primary metric (left) and placement (right)."""
    modalities = list(dict.fromkeys(r["modality"] for r in rows))
    taus = sorted({float(r["tau"]) for r in rows})
    width = 0.8 / len(taus)
    fig, axes = plt.subplots(1, 2, figsize=(3.6 * len(modalities) + 2, 4))
    for ax, key, attribute, title in ((axes[0], "value", "primary_metric", "class / joint aware"),
                                      (axes[1], "placement", "placement_metric", "placement only")):
        for k, tau in enumerate(taus):
            means, stds = [], []
            for m in modalities:
                values = [float(r[key]) for r in rows if r["modality"] == m and float(r["tau"]) == tau]
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
    write_rows(rows, out / "metrics.csv")
    write_csv(ceilings, out / "vae_ceiling.csv")
    (out / "config.json").write_text(json.dumps(config, indent=1, default=str))
    bar_plot(rows, out / "modalities.png")
    grid_images = {}
    for (modality, tau), images in grids.items():
        grid = layouts_grid(images, layouts[modality])
        grid_images[(modality, tau)] = grid
        save_image(grid.float() / 255, out / f"samples_{modality}_tau{tau:g}.png")
    (out / "summary.md").write_text(summary_text(out, rows, config, ceilings))
    log_dir = out / "tensorboard"
    if log_dir.exists():
        shutil.rmtree(log_dir)
    with SummaryWriter(str(log_dir)) as writer:
        for (modality, tau), grid in grid_images.items():
            writer.add_image(f"samples/{modality}_tau_{tau:g}", grid, 0)
        for row in rows:
            names = [*get_modality(row["modality"]).metric_names, "value"]
            metrics = {f"hp/{m}": float(row[m]) for m in names if row.get(m) not in (None, "")}
            writer.add_hparams({"modality": row["modality"], "train_seed": int(row["train_seed"]),
                                "tau": float(row["tau"]), "seed": int(row["seed"])}, metrics,
                               run_name=f"{row['modality']}_train{row['train_seed']}_tau{float(row['tau']):g}_seed{row['seed']}")


def cells(rows: list[dict]) -> list[dict]:
    """Rows with a `cell` column naming modality, its metrics and tau (the arm of the headline table)."""
    return [{**r, "cell": f"{r['modality']} ({r['metric']} / {r['placement_metric']}) tau={float(r['tau']):g}"}
            for r in rows]


def bound_notes(rows: list[dict], ceilings: list[dict]) -> list[str]:
    """Per modality, the headline metrics that cannot rank anything at full grounding: those whose 95% interval
    reaches the VAE ceiling (the autoencoder caps them) or that sit at their maximum 1 in every row (saturated)."""
    notes = []
    top = max(float(r["tau"]) for r in rows)
    for ceiling in ceilings:
        mine = [r for r in rows if r["modality"] == ceiling["modality"] and float(r["tau"]) == top]
        for key in ("value", "placement"):
            metric = ceiling["metric" if key == "value" else "placement_metric"]
            values = [float(r[key]) for r in mine if r.get(key) not in (None, "")]
            if not values:
                continue
            found = stats.summarize_values(stats.nested_values(mine, key))
            if min(values) >= 1.0:
                notes.append(f"{ceiling['modality']} {metric} = 1 in every row at tau {top:g}: saturated")
            elif found["high"] >= float(ceiling[key]):
                notes.append(f"{ceiling['modality']} {metric} at tau {top:g} reaches the VAE ceiling "
                             f"{float(ceiling[key]):.3f} (interval up to {found['high']:.3f}): capped by the "
                             "autoencoder")
    return notes


def modality_metrics(modality: str, rows: list[dict]) -> list[str]:
    return [m for m in get_modality(modality).metric_names if rows[0].get(m) not in (None, "")]


def summary_text(out: Path, rows: list[dict], config: dict, ceilings: list[dict]) -> str:
    """summary.md from the rows (metrics.csv), config (config.json) and VAE ceilings (vae_ceiling.csv) alone."""
    headline_table = stats.interval_table(cells(rows), "cell", ["value", "placement"])
    ceiling_table = "\n".join(["| modality | primary | placement |", "|---|---|---|",
                               *[f"| {c['modality']} | {c['metric']} {float(c['value']):.3f} | "
                                 f"{c['placement_metric']} {float(c['placement']):.3f} |" for c in ceilings]])
    n_train = len({str(r["train_seed"]) for r in rows})
    notes = bound_notes(rows, ceilings)
    summary = ["# Grounding modalities: each modality's own metric, GLIGEN (tau = 1) vs the base LDM (tau = 0)", "",
               f"Command: `{command_line()}`", "",
               (f"scored at git {commits(r['git_commit'] for r in rows)} (per model below), training seeds "
                f"{sorted({int(r['train_seed']) for r in rows})} "
                f"(one model per modality and seed), sampling seeds {config['seeds']}, {config['num_images']} layouts "
                f"per cell, sampler {config['sampler']}, {config['steps']} steps, guidance {config['guidance']}. "
                "tau = 0 is the frozen base LDM on the same layouts and seeds."), "",
               ("Primary metric (class / joint aware) and placement metric (class = colour; persons class-agnostic) "
                "per modality: mean over training seeds ± their std [95% bootstrap interval] ("
                + ("one trained model per modality: the intervals cover sampling noise only" if n_train == 1 else
                   f"{n_train} trained models per modality") + "):"), "", headline_table,
               "", ("VAE ceiling: the same metrics on VAE reconstructions of the real images of the same layouts "
                    "(what the latent space can carry; no model on this VAE can score higher):"), "", ceiling_table,
               ""]
    if notes:
        summary += ["Not a headline (ceiling or saturation): " + "; ".join(notes) + ".", ""]
    for modality in dict.fromkeys(r["modality"] for r in rows):
        mine = [r for r in rows if r["modality"] == modality]
        summary += [f"## {modality}", "", f"config hash `{mine[0]['config_hash']}`", "", *model_table(mine), "",
                    *interval_sections(mine, "tau", modality_metrics(modality, mine)),
                    "Samples: " + ", ".join(f"samples_{modality}_tau{t:g}.png" for t in config["taus"]), ""]
    summary += [("Files: metrics.csv (every row), vae_ceiling.csv, modalities.png, samples_*.png (first training "
                 f"seed, sampling seed {config['seeds'][0]}, layout drawn), tensorboard/ "
                 f"(`tensorboard --logdir {out / 'tensorboard'}`)."), "", summary_marker("modality"), ""]
    return "\n".join(summary)


def main(argv=None) -> None:
    config = parse_args(argv)
    torch.manual_seed(0)
    locations = [config.get("pretrained"), config.get("val_shards")]  # gligen.toy.build.is_toy_world decides
    toy = ensure_toy_world(config["toy_cache"], config["toy_config"], locations) is not None
    train_seeds = training_seeds(config)
    rows, grids, layouts, ceilings = [], {}, {}, []
    for modality in config["modalities"]:
        layouts[modality] = modality_layouts(modality, config, toy)[0]
        for train_seed in train_seeds:
            modality_rows, modality_grids, ceiling = scored_model(modality, config, toy, train_seed)
            rows += modality_rows
            if train_seed == train_seeds[0]:  # one model's samples and the VAE (the same base for every seed)
                grids.update({(modality, tau): images for tau, images in modality_grids.items()})
                ceilings.append(ceiling)
    write_results(Path(config["out"]), rows, grids, layouts, config, ceilings)
    print(f"wrote {config['out']}")
