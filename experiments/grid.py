"""A training grid: gamma_init x modality x seed, one fixed run directory per cell, run by Slurm or locally.

    python experiments/grid.py expand                 # <out>/configs/<cell>.yaml + <out>/cells.txt
    python experiments/grid.py submit [-- sbatch args] # expand, then one sbatch array over the cells (slurm/grid.sh)
    python experiments/grid.py run-local              # expand, then train the cells one after another, here
    python experiments/grid.py collect                # <out>/summary.csv from the cells' checkpoints + TensorBoard

Defaults: experiments/configs/grid.yaml (--config FILE overrides it, flags override both). A cell is named
`gamma<g>_<modality>_seed<s>` and trains into `<out>/<cell>` (TensorBoard events, config.yaml, checkpoints/), so a
cell that is submitted or run again continues (or finds finished) its run. Only modality "box" exists for now.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing too

from gligen.results import config_hash, git_commit, write_csv  # noqa: E402

DEFAULTS = Path(__file__).parent / "configs" / "grid.yaml"
SUPPORTED_MODALITIES = ("box",)  # what GLIGENModule implements


def load_grid(config: str | None = None, **overrides) -> dict:
    grid = yaml.safe_load(DEFAULTS.read_text())
    if config:
        grid.update(yaml.safe_load(Path(config).read_text()) or {})
    grid.update({k: v for k, v in overrides.items() if v is not None})
    return grid


def cell_name(gamma_init: float, modality: str, seed: int) -> str:
    return f"gamma{float(gamma_init):g}_{modality}_seed{int(seed)}"


def set_dotted(config: dict, key: str, value) -> None:
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def cells(grid: dict) -> list[dict]:
    """Every cell: name, its axis values, its run dir and its full training config."""
    unsupported = sorted(set(grid["modality"]) - set(SUPPORTED_MODALITIES))
    if unsupported:
        raise SystemExit(f"modalities {unsupported} are not implemented in GLIGENModule yet; the grid supports "
                         f"{list(SUPPORTED_MODALITIES)}")
    base = yaml.safe_load(Path(grid["base_config"]).read_text())
    out = []
    for gamma, modality, seed in itertools.product(grid["gamma_init"], grid["modality"], grid["seeds"]):
        name = cell_name(gamma, modality, seed)
        config = copy.deepcopy(base)
        for key, value in (grid.get("overrides") or {}).items():
            set_dotted(config, key, value)
        config["seed_everything"] = int(seed)
        config.setdefault("model", {})
        config["model"]["gamma_init"] = float(gamma)
        config["model"]["modality"] = modality
        run_dir = Path(grid["out"]) / name
        config["run_dir"] = str(run_dir)
        out.append({"cell": name, "gamma_init": float(gamma), "modality": modality, "seed": int(seed),
                    "run_dir": run_dir, "config": config})
    return out


def expand(grid: dict) -> list[Path]:
    """Writes <out>/configs/<cell>.yaml for every cell and <out>/cells.txt (one config path a line)."""
    configs_dir = Path(grid["out"]) / "configs"
    configs_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for cell in cells(grid):
        path = configs_dir / f"{cell['cell']}.yaml"
        header = f"# cell {cell['cell']} of experiments/grid.py (base {grid['base_config']})\n"
        path.write_text(header + yaml.safe_dump(cell["config"], sort_keys=False))
        paths.append(path)
    (Path(grid["out"]) / "cells.txt").write_text("".join(f"{p}\n" for p in paths))
    return paths


def build_toy_world_if_used(grid: dict) -> None:
    base = yaml.safe_load(Path(grid["base_config"]).read_text())
    toy_cache = grid.get("toy_cache")
    if toy_cache and str((base.get("model") or {}).get("pretrained", "")).startswith(str(toy_cache)):
        from gligen.toy.build import ToyBuildConfig, build

        build(toy_cache, ToyBuildConfig.from_yaml(grid["toy_config"]))


def submit(grid: dict, sbatch_args: list[str]) -> str:
    paths = expand(grid)
    cells_file = Path(grid["out"]) / "cells.txt"
    command = ["sbatch", "--parsable", f"--array=0-{len(paths) - 1}", *sbatch_args,
               str(REPO / "slurm" / "grid.sh"), str(cells_file)]
    print(" ".join(command))
    job = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().split(";")[0]
    print(f"submitted array job {job}: {len(paths)} cells -> {grid['out']}/<cell>")
    return job


def run_local(grid: dict) -> list[Path]:
    from gligen.cli import fit_from_config

    build_toy_world_if_used(grid)
    return [fit_from_config(str(path)) for path in expand(grid)]


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard scalars of a run directory: tag -> [(step, value)] (all event files, in step order)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for events in sorted(run_dir.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in accumulator.Scalars(tag)})
    return {tag: sorted(values.items()) for tag, values in out.items()}


def mean_last(series: list[tuple[int, float]], n: int = 10) -> float | None:
    values = [v for _, v in series[-n:]]
    return sum(values) / len(values) if values else None


def collect(grid: dict) -> Path:
    """<out>/summary.csv: one row per cell (missing runs marked), with final step, losses and gate values."""
    import torch

    rows, commit = [], git_commit()
    for cell in cells(grid):
        run_dir = cell["run_dir"]
        row = {k: cell[k] for k in ("cell", "gamma_init", "modality", "seed")}
        last = run_dir / "checkpoints" / "last.ckpt"
        row["status"] = "done" if last.exists() else "missing"
        row["global_step"] = torch.load(last, map_location="cpu", weights_only=True)["global_step"] \
            if last.exists() else None
        series = scalars(run_dir) if run_dir.exists() else {}
        row["train_loss_last10"] = mean_last(series.get("train/loss", []))
        row["val_loss_last"] = mean_last(series.get("val/loss", []), 1)
        for kind in ("gate_attn", "gate_dense"):
            finals = [s[-1][1] for tag, s in series.items() if tag.startswith(kind + "/") and s]
            row[f"{kind}_mean_final"] = sum(finals) / len(finals) if finals else None
        row["run_dir"] = str(run_dir)
        row["config_hash"] = config_hash(cell["config"])
        row["git_commit"] = commit
        rows.append(row)
    path = Path(grid["out"]) / "summary.csv"
    write_csv(rows, path)
    print(f"wrote {path} ({sum(r['status'] == 'done' for r in rows)}/{len(rows)} cells done)")
    return path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("command", choices=["expand", "submit", "run-local", "collect"])
    parser.add_argument("--config", help="YAML overriding experiments/configs/grid.yaml")
    parser.add_argument("--base-config", dest="base_config")
    parser.add_argument("--out")
    parser.add_argument("--gamma-init", dest="gamma_init", type=float, nargs="+")
    parser.add_argument("--modality", nargs="+")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--set", dest="overrides", nargs="+", metavar="KEY=VALUE",
                        help="dotted overrides for every cell, e.g. trainer.max_steps=1000 (YAML values)")
    args, sbatch_args = parser.parse_known_args(argv)
    if sbatch_args and args.command != "submit":
        parser.error(f"unrecognized arguments: {sbatch_args}")
    overrides = None
    if args.overrides:
        overrides = dict(item.split("=", 1) for item in args.overrides)
        overrides = {k: yaml.safe_load(v) for k, v in overrides.items()}
    grid = load_grid(args.config, base_config=args.base_config, out=args.out, gamma_init=args.gamma_init,
                     modality=args.modality, seeds=args.seeds)
    if overrides:
        grid["overrides"] = {**(grid.get("overrides") or {}), **overrides}
    return args.command, grid, [a for a in sbatch_args if a != "--"]


def main(argv=None) -> None:
    command, grid, sbatch_args = parse_args(argv)
    if command == "expand":
        print("\n".join(str(p) for p in expand(grid)))
    elif command == "submit":
        submit(grid, sbatch_args)
    elif command == "run-local":
        run_local(grid)
        collect(grid)
    else:
        collect(grid)


if __name__ == "__main__":
    main()
