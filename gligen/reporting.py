"""Writing experiment results: CSV + markdown summary + plots + sample grids + TensorBoard (HParams, images)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on clusters
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402
from torchvision.utils import save_image  # noqa: E402

from .evaluation import layout_tensors  # noqa: E402
from .results import mean_std_table, write_csv  # noqa: E402
from .visualize import layout_grid  # noqa: E402

BETA_METRICS = ["ap", "ap50", "ap75", "miou", "coarse_ap50", "coarse_miou", "fid", "kid"]  # coarse_*: if measured


def grid_image(images: list[np.ndarray], layouts: list[dict], nrow: int = 4) -> torch.Tensor:
    """uint8 [3, H, W] grid of images with their layouts drawn (enlarged for tiny toy images)."""
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    boxes, masks, phrases = layout_tensors(layouts[: len(images)])
    upscale = max(1, 128 // pixels.shape[-1])
    return layout_grid(pixels, boxes, masks, phrases, nrow=nrow, upscale=upscale)


def command_line() -> str:
    """The command that is running, as a user would type it (`python -m pkg ...` for module runs)."""
    if not sys.argv or not sys.argv[0]:
        return "(library call)"
    program = Path(sys.argv[0])
    if program.name == "__main__.py":  # python -m gligen.toy ...: argv[0] is the package's __main__.py
        parts = program.resolve().parent.parts
        program_text = "-m " + ".".join(parts[parts.index("gligen"):]) if "gligen" in parts else str(program)
    else:
        try:
            program_text = str(program.resolve().relative_to(Path.cwd()))
        except ValueError:
            program_text = str(program)
    return " ".join(["python", program_text, *sys.argv[1:]])


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
    grounding = "coarse_ap50" if "coarse_ap50" in rows[0] else "ap50"
    plot_against(rows, "tau", grounding, "fid", out / "ap_fid_vs_tau.png",
                 f"grounding ({grounding}) and quality (FID) vs tau")
    for tau, images in grids.items():
        save_image(grid_image(images, layouts).float() / 255, out / f"samples_tau{tau:g}.png")
    provenance = rows[0]
    summary = [
        "# Scheduled sampling sweep (beta = 1 for the first tau of the steps, then 0)",
        "",
        f"Command: `{command_line()}`",
        "",
        f"git commit `{provenance['git_commit']}`, config hash `{provenance['config_hash']}`, "
        f"{provenance['num_images']} layouts per cell, seeds {sorted({r['seed'] for r in rows})}, "
        f"sampler {config['sampler']}, {config['steps']} steps, guidance {config['guidance']}.",
        "",
        "Mean ± std over seeds:",
        "",
        mean_std_table(rows, "tau", [m for m in BETA_METRICS if m in rows[0]]),
        "",
        "Files: metrics.csv (every row), ap_fid_vs_tau.png, samples_tau*.png (seed 0, layout drawn), "
        "tensorboard/ (`tensorboard --logdir " + str(out / "tensorboard") + "`).",
        "",
    ]
    (out / "summary.md").write_text("\n".join(summary))
    write_tensorboard(out / "tensorboard", rows, grids, layouts, "tau")


def write_tensorboard(log_dir: Path, rows: list[dict], grids: dict, layouts: list[dict], axis: str) -> None:
    """Sample grids per axis value and one HParams run per row (metrics under hp/)."""
    if log_dir.exists():
        shutil.rmtree(log_dir)  # a rerun replaces the sweep, as the CSV is replaced
    with SummaryWriter(str(log_dir)) as writer:
        for value, images in grids.items():
            writer.add_image(f"samples/{axis}_{value:g}", grid_image(images, layouts), 0)
        for row in rows:
            hparams = {axis: float(row[axis]), "seed": int(row["seed"])}
            metrics = {f"hp/{m}": float(row[m]) for m in BETA_METRICS if m in row}
            writer.add_hparams(hparams, metrics, run_name=f"{axis}{row[axis]:g}_seed{row['seed']}")
