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
from gligen.evaluation.results import commits, mean_std_table, model_table, write_rows
from gligen.evaluation.visualize import layouts_grid
from gligen.modalities import DEFAULT_MODALITY, get_modality, modality_names

QUALITY_METRICS = ["fid", "kid"]
IMAGE_METRICS = ["style_adherence", "fidelity_error"]  # of an image scorer (sweep config `image_scorer`)


def beta_metrics() -> list[str]:
    """Every registered modality's grounding metrics (`Modality.metric_names`, in registry order), then the image
    scorer's and quality; a sweep reports those it measured."""
    return [m for name in modality_names() for m in get_modality(name).metric_names] + IMAGE_METRICS + QUALITY_METRICS


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
    write_rows(rows, out / "metrics.csv")
    (out / "config.json").write_text(json.dumps(config, indent=1, default=str))
    grounding = primary_metric(rows[0])
    plot_against(rows, "tau", grounding, "fid", out / "ap_fid_vs_tau.png",
                 f"grounding ({grounding}) and quality (FID) vs tau")
    for tau, images in grids.items():
        save_image(grid_image(images, layouts).float() / 255, out / f"samples_tau{tau:g}.png")
    (out / "summary.md").write_text(beta_sweep_summary(out, rows, config))
    write_tensorboard(out / "tensorboard", rows, grids, layouts, "tau")


def beta_sweep_summary(out: Path, rows: list[dict], config: dict) -> str:
    """summary.md of one tau sweep, from its rows (metrics.csv) and config (config.json) alone."""
    grounding = primary_metric(rows[0])
    provenance = rows[0]
    modality = f" ({provenance['modality']})" if provenance.get("modality") else ""
    summary = [
        "# Scheduled sampling sweep (beta = 1 for the first tau of the steps, then 0)",
        "",
        f"Command: `{command_line()}`",
        "",
        (f"git commit `{provenance['git_commit']}`, config hash `{provenance['config_hash']}`, "
         f"{provenance['num_images']} layouts per cell, seeds {sorted({int(r['seed']) for r in rows})}, "
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
        *interval_sections(rows, "tau", summary_metrics(provenance)),
        *_verdict_lines(rows),
        "Files: metrics.csv (every row), ap_fid_vs_tau.png, samples_tau*.png (seed 0, layout drawn), "
        "tensorboard/ (`tensorboard --logdir " + str(out / "tensorboard") + "`).",
        "",
    ]
    return "\n".join([*summary, summary_marker("beta_sweep"), ""])


def interval_sections(rows: list[dict], arm: str, metrics: list[str], paired: bool | None = None) -> list[str]:
    """Summary lines: each arm's mean over training seeds with its std and 95% bootstrap interval
    (gligen.evaluation.stats), and every arm minus the first (lowest) one, * where the interval excludes 0.
    `paired` as in stats.compare: False for arms that are different trained models under the same seed numbers
    (the gamma_init arms of a grid), None to pair arms with the same seeds (the tau values of one model)."""
    n_train = len({str(r.get("train_seed", 0) or 0) for r in rows})
    baseline = min((str(r[arm]) for r in rows), key=stats.arm_order)
    own_models = paired is False  # every arm its own trained models
    if n_train == 1:
        note = (f"one trained model{' per arm' * own_models}: the intervals cover sampling noise only, not training "
                "variance")
    else:
        note = (f"{n_train} training seeds per arm, each arm its own trained models" if own_models else
                f"{n_train} trained models (training seeds)") + "; sampling seeds nest inside them"
    resampled, n_layouts = stats.resampled_metrics(rows, metrics)
    if resampled:
        rest = [m for m in metrics if m not in resampled]
        note += (f"; the {n_layouts} layouts resampled too for {', '.join(resampled)}" +
                 (f" (not {', '.join(rest)}: one value per row)" if rest else ""))
    else:
        note += "; layouts not resampled (these rows carry no layout records)"
    pairing = (f"unpaired: every {arm} is a different trained model, each arm resampled on its own" if own_models
               else "paired: the same models and sampling seeds in both arms")
    found = stats.comparisons(rows, arm, baseline, metrics, paired=paired)
    flat = stats.indistinct_metrics(found)
    caveat = ([f"Not a headline here: {', '.join(flat)} (no {arm} differs from {baseline} beyond its interval: a "
               "floor, a ceiling or noise).", ""] if flat else [])
    return [f"Mean over training seeds ± their std [95% bootstrap interval] ({note}):", "",
            stats.interval_table(rows, arm, metrics), "",
            f"Differences from {arm} = {baseline} [95% interval] (* the interval excludes 0; {pairing}):", "",
            stats.comparison_table(found, arm, baseline), "", *caveat]


def beta_verdict(rows: list[dict], placement: str, style: str = "style_adherence", keep: float = 0.9) -> str | None:
    """The sweep's verdict in one sentence, on layouts that ask for a style (None without `style` in the rows): the
    tau that best trades placement gained (share of tau 1's gain over tau 0) against style loss avoided (share of
    the fall in adherence from tau 0 to tau 1 that does not happen), or, when style adherence does not fall by more
    than 0.05, that there is no trade-off to make. Means over all rows of a tau (training and sampling seeds)."""
    if not any(r.get(style) not in (None, "") for r in rows):
        return None
    taus = sorted({float(r["tau"]) for r in rows})
    mean = {m: {t: float(np.mean([float(r[m]) for r in rows if float(r["tau"]) == t])) for t in taus}
            for m in (placement, style)}
    low, high = taus[0], taus[-1]
    gain, loss = mean[placement][high] - mean[placement][low], mean[style][low] - mean[style][high]
    trend = (f"{style} {mean[style][low]:.3f} at tau {low:g} -> {mean[style][high]:.3f} at tau {high:g}, {placement} "
             f"{mean[placement][low]:.3f} -> {mean[placement][high]:.3f}")
    if loss <= 0.05 or gain <= 0:
        why = "style adherence does not fall with tau" if loss <= 0.05 else "grounding gains no placement"
        return f"No trade-off to make here ({trend}): {why}; tau = {high:g} is best for placement."
    share = {t: ((mean[placement][t] - mean[placement][low]) / gain, (mean[style][t] - mean[style][high]) / loss)
             for t in taus}
    kept = [t for t in taus if share[t][0] >= keep and share[t][1] >= keep]
    best = max(kept) if kept else max(taus, key=lambda t: sum(share[t]))
    placed, styled = share[best]
    avoided = "all" if styled >= 1 else f"{styled:.0%}"  # above 1: the style is kept better than at tau 0
    return (f"tau = {best:g} keeps {placed:.0%} of full grounding's placement gain and avoids {avoided} of its style "
            f"loss ({placement} {mean[placement][best]:.3f} and {style} {mean[style][best]:.3f} at tau {best:g}; "
            f"{trend}).")


def _verdict_lines(rows: list[dict]) -> list[str]:
    verdict = beta_verdict(rows, primary_metric(rows[0]))
    return [f"Verdict: {verdict}", ""] if verdict else []


def write_seed_summary(out: str | Path, rows: list[dict], config: dict) -> None:
    """metrics.csv, summary.md and the plot over every training seed's sweep (each in <out>/train_seed<s>)."""
    out = Path(out)
    write_rows(rows, out / "metrics.csv")
    (out / "config.json").write_text(json.dumps(config, indent=1, default=str))
    grounding = primary_metric(rows[0])
    n_train = len({str(r["train_seed"]) for r in rows})
    plot_against(rows, "tau", grounding, "fid", out / "ap_fid_vs_tau.png",
                 f"grounding ({grounding}) and quality (FID) vs tau, {n_train} training seeds")
    (out / "summary.md").write_text(seed_summary(rows, config))


def summary_metrics(row: dict) -> list[str]:
    """What a sweep summary's intervals cover: the modality's placement and primary grounding metrics, the image
    scorer's (style adherence, fidelity error; those measured), then FID."""
    modality = get_modality(row.get("modality") or DEFAULT_MODALITY)
    measured = [m for m in (modality.placement_metric, modality.primary_metric, *IMAGE_METRICS)
                if row.get(m) not in (None, "")]
    return list(dict.fromkeys(measured)) + ["fid"]


def seed_summary(rows: list[dict], config: dict) -> str:
    """summary.md over training seeds, from the rows of every seed's sweep (metrics.csv) and config (config.json)."""
    lines = ["# Scheduled sampling sweep over training seeds", "", f"Command: `{command_line()}`", "",
             (f"scored at git {commits(r['git_commit'] for r in rows)} (per model below), {rows[0]['num_images']} "
              f"layouts per cell, sampling seeds "
              f"{sorted({int(r['seed']) for r in rows})} (each model its own, so sampling noise is part of the spread "
              f"over models), sampler {config['sampler']}, {config['steps']} steps, guidance {config['guidance']}; "
              f"base `{config.get('pretrained')}`."), "",
             *model_table(rows), "",
             *interval_sections(rows, "tau", summary_metrics(rows[0])),
             *_verdict_lines(rows),
             "Per training seed: train_seed<s>/ (metrics.csv, summary.md, sample grids, tensorboard/).", "",
             summary_marker("seed_sweeps"), ""]
    return "\n".join(lines)


def summary_marker(kind: str) -> str:
    """The last line of a summary.md: which function wrote it, so `python experiments/verify.py` can recompute its
    tables from the rows."""
    return f"<!-- gligen summary: {kind}; its tables recompute from the rows (python experiments/verify.py) -->"


def table_blocks(text: str) -> list[str]:
    """The markdown tables of a text, in order (each a block of consecutive lines starting with '|')."""
    blocks, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            blocks.append("\n".join(current))
            current = []
    return blocks + (["\n".join(current)] if current else [])


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


def grid_stats_rows(rows: list[dict]) -> list[dict]:
    """A grid summary's swept rows in the keys gligen.evaluation.stats reads: its `seed` (the cell's training seed)
    as train_seed, its `sample_seed` as seed; tau and gamma_init as numbers. Rows without a tau (cells not swept)
    are left out."""
    return [{**r, "train_seed": r["seed"], "seed": r["sample_seed"], "tau": float(r["tau"]),
             "gamma_init": float(r["gamma_init"])} for r in rows if r.get("tau") not in (None, "")]


def write_grid_summary(out: str | Path, rows: list[dict], command: str | None = None) -> Path:
    """<out>/summary.md of a training grid's summary rows (experiments/grid.py collect)."""
    path = Path(out) / "summary.md"
    path.write_text(grid_summary(rows, command))
    return path


def grid_summary(rows: list[dict], command: str | None = None) -> str:
    """A grid's summary from its summary.csv rows alone: the command, git commits, cells trained / swept, then per
    modality, at the smallest tau (the base LDM at tau 0) and the largest (full grounding), the 95% intervals over
    training seeds per gamma_init of its grounding metric and FID with the (unpaired) differences from the first
    gamma_init, and the (paired) largest minus smallest tau per gamma_init."""
    cells = {}  # cell -> one of its rows (status and sweep_status are the cell's)
    for row in rows:
        cells.setdefault(row.get("cell") or (row["gamma_init"], row["modality"], row["seed"]), row)
    trained = sum(r.get("status") == "done" for r in cells.values())
    swept_cells = sum(r.get("sweep_status") == "done" for r in cells.values())
    commits = sorted({str(r["git_commit"]) for r in rows if r.get("git_commit")})
    swept = grid_stats_rows(rows)
    lines = ["# Training grid: gamma_init x modality x training seed, a tau sweep per cell", "",
             f"Command: `{command or command_line()}`", "",
             f"git commit{'s' if len(commits) > 1 else ''}: {', '.join(f'`{c}`' for c in commits) or 'unknown'}.", "",
             f"{trained}/{len(cells)} cells trained, {swept_cells} swept ({len(swept)} rows of cell x tau x sampling "
             "seed).", ""]
    lines += _grid_training_sections(cells)
    if not swept:
        lines += ["No cell is swept yet: no grounding intervals. Sweep the cells (run-local or submit), then collect "
                  "again.", ""]
    else:
        lines += ["Intervals rest on the training seeds (each a separately trained model), sampling seeds nested "
                  "inside them (gligen.evaluation.stats). Differences between gamma_init values are unpaired: every "
                  "gamma_init is a different trained model, even under the same seed numbers. Differences between "
                  "tau values are paired: the same model and sampling seeds at both.", ""]
        for modality in dict.fromkeys(str(r["modality"]) for r in swept):
            lines += _grid_modality_sections(modality, [r for r in swept if str(r["modality"]) == modality])
    lines += ["Files: summary.csv (every row)" + (", grounding_vs_tau.png, tensorboard/ (HParams: one run per row)."
                                                  if swept else "."), "", summary_marker("grid"), ""]
    return "\n".join(lines)


TRAINING_METRICS = ["gate_attn_mean_final", "train_loss_last10", "val_loss_last"]  # per cell, from its TensorBoard


def _grid_training_sections(cells: dict) -> list[str]:
    """Per modality, what training did per gamma_init (the gates' final tanh(gamma), losses): one value per trained
    cell, so the interval is over training seeds; differences unpaired (every gamma_init its own models)."""
    done = [{**r, "train_seed": r["seed"], "seed": 0, "gamma_init": float(r["gamma_init"])}
            for r in cells.values() if r.get("status") == "done"]
    lines = []
    for modality in dict.fromkeys(str(r["modality"]) for r in done):
        mine = [r for r in done if str(r["modality"]) == modality]
        metrics = [m for m in TRAINING_METRICS if any(r.get(m) not in (None, "") for r in mine)]
        if metrics:
            lines += [f"## {modality}: training, per gamma_init", "",
                      *interval_sections(mine, "gamma_init", metrics, paired=False)]
    return lines


def _grid_modality_sections(modality: str, rows: list[dict]) -> list[str]:
    """One modality's part of the grid summary (rows: grid_stats_rows of its cells)."""
    metrics = [primary_metric(rows[0]), "fid"]
    taus = sorted({r["tau"] for r in rows})
    lines = [f"## {modality}", "", f"Grounding metric: {metrics[0]}; quality: fid.", ""]
    for tau in dict.fromkeys((taus[0], taus[-1])):
        what = " (the base LDM: no grounding)" if tau == 0 else " (grounding at every step)" if tau == 1 else ""
        lines += [f"### tau = {tau:g}{what}: per gamma_init", "",
                  *interval_sections([r for r in rows if r["tau"] == tau], "gamma_init", metrics, paired=False)]
    if len(taus) > 1:
        found: dict[str, dict[str, dict]] = {m: {} for m in metrics}
        for gamma in sorted({r["gamma_init"] for r in rows}):
            ends = [r for r in rows if r["gamma_init"] == gamma and r["tau"] in (taus[0], taus[-1])]
            for metric, by_tau in stats.comparisons(ends, "tau", str(taus[0]), metrics).items():
                if str(taus[-1]) in by_tau:
                    found[metric][str(gamma)] = by_tau[str(taus[-1])]
        found_all = [c for by_gamma in found.values() for c in by_gamma.values()]
        n_train = sorted({c["n_train"] for c in found_all})
        pairing = ("paired: the same model and sampling seeds at both tau" if all(c["paired"] for c in found_all)
                   else "paired where both tau have the same sampling seeds, else unpaired")
        lines += [f"### tau = {taus[-1]:g} minus tau = {taus[0]:g}, per gamma_init", "",
                  f"Each gamma_init's tau = {taus[-1]:g} minus tau = {taus[0]:g} [95% interval] (* the interval "
                  f"excludes 0; {pairing}; {' / '.join(map(str, n_train))} training seeds per gamma_init):", "",
                  stats.comparison_table(found, f"gamma_init: tau {taus[-1]:g}", f"tau {taus[0]:g}"), ""]
    return lines
