"""Gamma-init ablation, locally: train one box-grounded GLIGEN per gamma_init (x seed), one after another, then
summarise how the gates tanh(gamma) and the loss evolve.

    python experiments/ablate_gamma.py                                   # toy world, gammas of grid.yaml, seeds 0-2
    python experiments/ablate_gamma.py --gamma_init [0,0.1,1] --seeds [0,1] --overrides '{trainer.max_steps: 1000}'
    python experiments/ablate_gamma.py --config experiments/configs/ablate_gamma_quick.yaml --sweep.enabled true

The gamma axis of experiments/grid.py (same cells, same run directories <out>/<cell>, so a cell trained here and
one trained by `grid.py submit` with the same --out are the same run); training only, unless --sweep.enabled true
adds each cell's tau sweep as grid.py does. Writes <out>/summary.csv and summary.md (as grid.py collect: the gates'
final tanh(gamma) and the losses per gamma_init with 95% intervals over the training seeds) and <out>/gates_vs_step.png
(mean tanh(alpha_attn) over fusers, and train loss, per cell). Settings: GammaAblationConfig
(gligen/experiments/config.py): `--help`, `--print_config`.
"""

import sys
from pathlib import Path

from gligen.experiments import grid as grid_lib
from gligen.experiments.cell_status import scalars
from gligen.experiments.config import GammaAblationConfig


def plot(grid: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (gates, loss) = plt.subplots(1, 2, figsize=(10, 4))
    for cell in grid_lib.cells(grid):
        series = scalars(cell["run_dir"]) if cell["run_dir"].exists() else {}
        attn = [s for tag, s in series.items() if tag.startswith("gate_attn/")]
        if attn:
            steps = [step for step, _ in attn[0]]
            means = [sum(s[i][1] for s in attn) / len(attn) for i in range(min(map(len, attn)))]
            gates.plot(steps[: len(means)], means, label=cell["cell"])
        if series.get("train/loss"):
            loss.plot(*zip(*series["train/loss"]), label=cell["cell"], alpha=0.7)
    gates.set(xlabel="step", ylabel="mean tanh(alpha_attn)", title="gates")
    loss.set(xlabel="step", ylabel="train/loss", title="loss", yscale="log")
    gates.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    grid = grid_lib.load_grid(argv=argv, cls=GammaAblationConfig, name="ablate_gamma", description=__doc__)
    grid_lib.run_local(grid)
    grid_lib.collect(grid)
    plot(grid, Path(grid["out"]) / "gates_vs_step.png")
    print(f"wrote {grid['out']}/summary.csv and gates_vs_step.png")
