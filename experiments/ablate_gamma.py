"""Gamma-init ablation, locally: train one box-grounded GLIGEN per gamma_init (x seed), one after another, then
summarise how the gates tanh(gamma) and the loss evolve.

    python experiments/ablate_gamma.py                                   # toy world, gammas of grid.yaml, seed 0
    python experiments/ablate_gamma.py --gamma-init 0 0.1 1 --seeds 0 1 --set trainer.max_steps=1000

The gamma axis of experiments/grid.py (same cells, same run directories <out>/<cell>, so a cell trained here and
one trained by `grid.py submit` with the same --out are the same run); training only, unless --sweep adds each
cell's tau sweep as grid.py does. Writes <out>/summary.csv (as grid.py collect) and <out>/gates_vs_step.png (mean
tanh(alpha_attn) over fusers, and train loss, per cell).
"""

import argparse
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing too
from gligen import grid as grid_lib


def plot(grid: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (gates, loss) = plt.subplots(1, 2, figsize=(10, 4))
    for cell in grid_lib.cells(grid):
        series = grid_lib.scalars(cell["run_dir"]) if cell["run_dir"].exists() else {}
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--config", help="YAML overriding experiments/configs/grid.yaml")
    parser.add_argument("--base-config", dest="base_config")
    parser.add_argument("--out", default="results/ablate_gamma")
    parser.add_argument("--gamma-init", dest="gamma_init", type=float, nargs="+")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--set", dest="overrides", nargs="+", metavar="KEY=VALUE", default=[])
    parser.add_argument("--sweep", action="store_true", help="also run each cell's tau sweep (as grid.py does)")
    args = parser.parse_args(argv)
    grid = grid_lib.load_grid(args.config, base_config=args.base_config, out=args.out, gamma_init=args.gamma_init,
                              seeds=args.seeds, modality=["box"])
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.overrides)}
    grid["overrides"] = {**(grid.get("overrides") or {}), **overrides}
    grid_lib.run_local(grid, sweep=args.sweep)
    grid_lib.collect(grid)
    plot(grid, Path(grid["out"]) / "gates_vs_step.png")
    print(f"wrote {grid['out']}/summary.csv and gates_vs_step.png")


if __name__ == "__main__":
    main()
