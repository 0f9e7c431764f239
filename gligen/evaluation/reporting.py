"""Writing experiment results: CSV + markdown summary + plots + sample grids + TensorBoard (HParams, images)."""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on clusters
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import save_image

from gligen.evaluation import stats
from gligen.evaluation.results import mean_std_table, write_csv
from gligen.evaluation.visualize import layouts_grid
from gligen.modalities import DEFAULT_MODALITY, get_modality, modality_names

QUALITY_METRICS = ["fid", "kid"]


def beta_metrics() -> list[str]:
    """Every registered modality's grounding metrics (`Modality.metric_names`, in registry order), then quality; a
    sweep reports those it measured."""
    return [m for name in modality_names() for m in get_modality(name).metric_names] + QUALITY_METRICS


def primary_metric(row: dict) -> str:
    """The grounding metric a sweep row is plotted and summarised by: its modality's placement metric where
    measured (what grounding controls whatever the base draws), else its primary one (`Modality.headline_metric`).
    Rows without a modality column are box rows (sweeps before the column existed)."""
    return get_modality(row.get("modality") or DEFAULT_MODALITY).headline_metric(row)


def grid_image(images: list[np.ndarray], layouts: list[dict], nrow: int = 4) -> torch.Tensor:
    """uint8 [3, H, W] grid of images with their layouts drawn, any modality (enlarged for tiny toy images)."""
    return layouts_grid(images, layouts, nrow=nrow)


def command_line(argv: list[str] | None = None, program: str | None = None) -> str:
    """The command that is running, as a user would type it (`python -m pkg ...` for module runs), its arguments
    shell-quoted so the recorded line can be pasted back. `argv` / `program` stand in for sys.argv[1:] / the script
    when a main() is called from Python."""
    if program is None:
        if not sys.argv or not sys.argv[0]:
            return "(library call)"
        path = Path(sys.argv[0])
        if path.name == "__main__.py":  # python -m gligen.toy ...: argv[0] is the package's __main__.py
            parts = path.resolve().parent.parts
            program = "-m " + ".".join(parts[parts.index("gligen"):]) if "gligen" in parts else str(path)
        else:
            try:
                program = str(path.resolve().relative_to(Path.cwd()))
            except ValueError:
                program = str(path)
    return " ".join(["python", program, *map(shlex.quote, sys.argv[1:] if argv is None else argv)])


def plot_against(rows: list[dict], x: str, left: str, right: str, path: Path, title: str) -> None:
    """Mean +- std over seeds of two metrics against `x`, on two y axes."""
    xs = sorted({float(r[x]) for r in rows})
    fig, ax1 = plt.subplots(figsize=(6, 4))
    ax2 = ax1.twinx()
    for ax, metric, color in ((ax1, left, "tab:blue"), (ax2, right, "tab:red")):
        values = [[float(r[metric]) for r in rows if float(r[x]) == v] for v in xs]
        mean = np.array([np.mean(v) for v in values])
        std = np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values])
        ax.errorbar(xs, mean, yerr=std, color=color, marker="o", capsize=3, label=metric)
        ax.set_ylabel(metric, color=color)
    ax1.set_xlabel(x)
    ax1.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_beta_sweep(out: str | Path, rows: list[dict], grids: dict[float, list[np.ndarray]],
                     layouts: list[dict], config: dict) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "metrics.csv")
    (out / "config.json").write_text(json.dumps(config, indent=1, default=str))
    grounding = primary_metric(rows[0])
    plot_against(rows, "tau", grounding, "fid", out / "ap_fid_vs_tau.png",
                 f"grounding ({grounding}) and quality (FID) vs tau")
    for tau, images in grids.items():
        save_image(grid_image(images, layouts).float() / 255, out / f"samples_tau{tau:g}.png")
    provenance = rows[0]
    modality = f" ({provenance['modality']})" if provenance.get("modality") else ""
    summary = [
        "# Scheduled sampling sweep (beta = 1 for the first tau of the steps, then 0)",
        "",
        f"Command: `{command_line()}`",
        "",
        (f"git commit `{provenance['git_commit']}`, config hash `{provenance['config_hash']}`, "
         f"{provenance['num_images']} layouts per cell, seeds {sorted({r['seed'] for r in rows})}, "
         f"sampler {config['sampler']}, {config['steps']} steps, guidance {config['guidance']}."),
        "",
        f"Checkpoint: `{provenance.get('ckpt', config.get('ckpt'))}` on base `{config.get('pretrained')}`.",
        "",
        f"Grounding metric{modality}: {grounding} (plotted against FID in ap_fid_vs_tau.png).",
        "",
        "Mean ± std over seeds:",
        "",
        mean_std_table(rows, "tau", [m for m in beta_metrics() if m in rows[0]]),
        "",
        *interval_sections(rows, "tau", [grounding, "fid"]),
        "Files: metrics.csv (every row), ap_fid_vs_tau.png, samples_tau*.png (seed 0, layout drawn), "
        "tensorboard/ (`tensorboard --logdir " + str(out / "tensorboard") + "`).",
        "",
    ]
    (out / "summary.md").write_text("\n".join(summary))
    write_tensorboard(out / "tensorboard", rows, grids, layouts, "tau")


def interval_sections(rows: list[dict], arm: str, metrics: list[str]) -> list[str]:
    """Summary lines: each arm's mean over training seeds with its std and 95% bootstrap interval
    (gligen.evaluation.stats), and every arm minus the first (lowest) one, * where the interval excludes 0."""
    n_train = len({str(r.get("train_seed", 0) or 0) for r in rows})
    baseline = min((str(r[arm]) for r in rows), key=stats.arm_order)
    note = ("one trained model: the intervals cover sampling noise only, not training variance"
            if n_train == 1 else f"{n_train} trained models (training seeds); sampling seeds nest inside them")
    found = stats.comparisons(rows, arm, baseline, metrics)
    flat = stats.indistinct_metrics(found)
    caveat = ([f"Not a headline here: {', '.join(flat)} (no {arm} differs from {baseline} beyond its interval: a "
               "floor, a ceiling or noise).", ""] if flat else [])
    return [f"Mean over training seeds ± their std [95% bootstrap interval] ({note}):", "",
            stats.interval_table(rows, arm, metrics), "",
            f"Differences from {arm} = {baseline} [95% interval] (* the interval excludes 0; paired: the same models "
            "and sampling seeds in both arms):", "", stats.comparison_table(found, arm, baseline), "", *caveat]


def write_seed_summary(out: str | Path, rows: list[dict], config: dict, checkpoints: dict[int, str]) -> None:
    """metrics.csv, summary.md and the plot over every training seed's sweep (each in <out>/train_seed<s>)."""
    out = Path(out)
    write_csv(rows, out / "metrics.csv")
    (out / "config.json").write_text(json.dumps(config, indent=1, default=str))
    grounding = primary_metric(rows[0])
    plot_against(rows, "tau", grounding, "fid", out / "ap_fid_vs_tau.png",
                 f"grounding ({grounding}) and quality (FID) vs tau, {len(checkpoints)} training seeds")
    identity = {str(r["train_seed"]): r for r in rows}
    lines = ["# Scheduled sampling sweep over training seeds", "", f"Command: `{command_line()}`", "",
             (f"git commit `{rows[0]['git_commit']}`, {rows[0]['num_images']} layouts per cell, sampling seeds "
              f"{sorted({r['seed'] for r in rows})}, sampler {config['sampler']}, {config['steps']} steps, guidance "
              f"{config['guidance']}; base `{config.get('pretrained')}`."), "",
             "| training seed | checkpoint | step | weights hash |", "|---|---|---|---|",
             *[f"| {seed} | `{ckpt}` | {identity[str(seed)].get('ckpt_step', '')} | "
               f"`{identity[str(seed)].get('ckpt_weights_hash', '')}` |" for seed, ckpt in checkpoints.items()], "",
             *interval_sections(rows, "tau", [grounding, "fid"]),
             "Per training seed: train_seed<s>/ (metrics.csv, summary.md, sample grids, tensorboard/).", ""]
    (out / "summary.md").write_text("\n".join(lines))


def write_tensorboard(log_dir: Path, rows: list[dict], grids: dict, layouts: list[dict], axis: str) -> None:
    """Sample grids per axis value and one HParams run per row (metrics under hp/)."""
    if log_dir.exists():
        shutil.rmtree(log_dir)  # a rerun replaces the sweep, as the CSV is replaced
    with SummaryWriter(str(log_dir)) as writer:
        for value, images in grids.items():
            writer.add_image(f"samples/{axis}_{value:g}", grid_image(images, layouts), 0)
        for row in rows:
            hparams = {axis: float(row[axis]), "seed": int(row["seed"])}
            metrics = {f"hp/{m}": float(row[m]) for m in beta_metrics() if m in row}
            writer.add_hparams(hparams, metrics, run_name=f"{axis}{row[axis]:g}_seed{row['seed']}")


GRID_AXES = ("gamma_init", "modality", "seed", "tau", "sample_seed")  # the HParams of a grid summary row


def write_grid_report(out: str | Path, rows: list[dict]) -> None:
    """Plots and TensorBoard HParams of a training grid's summary rows (experiments/grid.py collect): metric vs
    tau, one line per (gamma_init, modality), mean +- std over training and sampling seeds, in
    <out>/grounding_vs_tau.png; one HParams run per cell x tau x seed in <out>/tensorboard. Rows without a tau
    (cells not swept yet) are left out of both."""
    out = Path(out)
    swept = [r for r in rows if r.get("tau") is not None]
    if not swept:
        return
    metrics = [m for m in ("ap50", "coarse_ap50", "miou", "pck", "oks_ap", "entity_ap50", "fid")
               if any(r.get(m) is not None for r in swept)]  # each modality's own (its cells only), FID for all
    groups = sorted({(float(r["gamma_init"]), str(r["modality"])) for r in swept})
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for gamma, modality in groups:
            mine = [r for r in swept if float(r["gamma_init"]) == gamma and str(r["modality"]) == modality
                    and r.get(metric) is not None]
            if not mine:
                continue
            taus = sorted({float(r["tau"]) for r in mine})
            values = [[float(r[metric]) for r in mine if float(r["tau"]) == t] for t in taus]
            mean = [np.mean(v) for v in values]
            std = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values]
            ax.errorbar(taus, mean, yerr=std, marker="o", capsize=3, label=f"gamma_init {gamma:g}, {modality}")
        ax.set(xlabel="tau", ylabel=metric, title=f"{metric} vs tau")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "grounding_vs_tau.png", dpi=120)
    plt.close(fig)

    log_dir = out / "tensorboard"
    if log_dir.exists():
        shutil.rmtree(log_dir)  # collect rewrites the summary, and its HParams view with it
    with SummaryWriter(str(log_dir)) as writer:
        for row in swept:
            hparams = {k: (str(row[k]) if k == "modality" else float(row[k])) for k in GRID_AXES}
            values = {f"hp/{m}": float(row[m]) for m in beta_metrics() if row.get(m) is not None}
            writer.add_hparams(hparams, values, run_name=f"{row['cell']}/tau{float(row['tau']):g}_seed"
                                                         f"{row['sample_seed']}")
