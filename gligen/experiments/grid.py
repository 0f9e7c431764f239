"""A training grid: gamma_init x modality x seed, one fixed run directory per cell, run by Slurm or locally. Every
cell trains, then sweeps tau on its checkpoint (the sweep of experiments/ablate_beta.py, gligen/experiments/sweep.py).

    python experiments/grid.py expand                 # <out>/configs/<cell>.yaml, <out>/sweeps/<cell>.yaml, cells.txt
    python experiments/grid.py submit [-- sbatch args] # expand, then one sbatch array over the cells (slurm/grid.sh)
    python experiments/grid.py run-local              # expand, then train + sweep the cells one after another, here
    python experiments/grid.py collect                # <out>/summary.csv (cell x tau x seed), summary.md (95%
                                                      # intervals over training seeds), plots, TensorBoard
    python experiments/grid.py trained CONFIG         # exit 0 when the cell of CONFIG finished training (grid.sh)
    python experiments/grid.py sweep-cell CONFIG      # the tau sweep of that cell, once (grid.sh, run-local)

Settings: GridConfig (gligen/experiments/config.py), defaults experiments/configs/grid.yaml; `--config FILE`
(repeatable) overrides it, flags override both, `--print_config` shows the result. Each modality trains from its own
base config (`base_configs:`, one YAML or YAMLs composed in order; `--base_config` uses one for every modality). A
cell is named `gamma<g>_<modality>_seed<s>` and trains into `<out>/<cell>` (TensorBoard events, config.yaml,
checkpoints/), its sweep goes to `<out>/<cell>/sweep/` (metrics.csv, summary.md, plots, tensorboard/,
sweep_done.json). Every modality sweeps, scored with its own metric (box ap50 / coarse_ap50, keypoint pck / oks_ap,
image / text_image entity_ap50; gligen.modalities, Modality.metrics); summary.csv has every metric column, empty where
a cell's modality does not measure it. A cell that is submitted or run again skips finished training and a finished
sweep, and continues an interrupted run. A trained and swept cell gets <out>/<cell>/cell_done.json
(gligen/experiments/cell_status.py), so a clone of committed results without the git-ignored checkpoints skips it
too, and `collect` reports its training from that marker.
"""

from __future__ import annotations

import copy
import itertools
import math
import subprocess
from pathlib import Path

import yaml

from gligen.evaluation import reporting
from gligen.evaluation.results import RECORDS, read_rows, write_rows
from gligen.experiments.cell_status import CELL_DONE, VAL, cell_complete, cell_sweeps, mark_complete, training_summary
from gligen.experiments.config import GridConfig, parse, to_dict
from gligen.experiments.sweep import sweep_checkpoint, sweep_done
from gligen.provenance import git_commit
from gligen.toy.build import ensure_toy_world
from gligen.training.cli import fit_from_config
from gligen.training.preemption import EXIT_INTERRUPTED, PREEMPTION_SIGNALS, requeue_slurm_job, slurm_job_id
from gligen.training.rundir import config_paths, describe_config, is_trained, load_config, max_steps_of, trained_step

OPTIONAL_SWEEP_KEYS = ("pose_detector", "entity_resolution", "image_scorer")  # left out of sweep configs when unset


def load_grid(config: str | None = None, argv: list[str] | None = None, cls=GridConfig, name: str = "grid",
              description: str | None = None, **overrides) -> dict:
    """The grid's settings as the mapping the functions here read: GridConfig's defaults,
    experiments/configs/<name>.yaml, the `config` file, `argv` (flags, more --config; None: none, not sys.argv),
    then `overrides` (not None)."""
    args = (["--config", str(config)] if config else []) + list(argv or [])
    grid = to_dict(parse(cls, args, name=name, description=description or __doc__))
    grid["sweep"] = {k: v for k, v in grid["sweep"].items() if v is not None or k not in OPTIONAL_SWEEP_KEYS}
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


def base_config(grid: dict, modality: str) -> list[Path]:
    """The training config a modality's cells start from (its files, composed in order): `base_config` for all when
    set, else `base_configs`."""
    if grid.get("base_config"):
        paths = config_paths(grid["base_config"])
    else:
        configs = grid.get("base_configs") or {}
        if modality not in configs:
            raise SystemExit(f"modality {modality!r} has no base config: add it to base_configs in "
                             f"experiments/configs/grid.yaml (known: {sorted(configs)})")
        paths = config_paths(configs[modality])
    for path in paths:
        if not path.exists():
            raise SystemExit(f"modality {modality!r}: its base config {path} does not exist (yet); write it, or "
                             f"drop {modality!r} from the grid's modality list")
    return paths


def sweep_config(grid: dict, cell: dict) -> dict:
    """The tau sweep of a cell (gligen.experiments.sweep.sweep_checkpoint's config): grid.yaml's `sweep:` settings,
    the cell's checkpoint and LDM, its validation shards and resolution (and entity_resolution, when its data sets
    one) unless `sweep:` names others; out <run_dir>/sweep. Every modality sweeps its own val shards (keypoint: the
    person shards of its base config), scored with its own metric."""
    settings = dict(grid.get("sweep") or {})
    settings.pop("enabled", None)
    config, data = cell["config"], ((cell["config"].get("data") or {}).get("init_args") or {})
    settings["pretrained"] = settings.get("pretrained") or (config.get("model") or {}).get("pretrained")
    settings["val_shards"] = settings.get("val_shards") or data.get("val_shards")
    settings["resolution"] = settings.get("resolution") or data.get("resolution")
    if data.get("entity_resolution") and not settings.get("entity_resolution"):  # image / text_image cells
        settings["entity_resolution"] = data["entity_resolution"]
    settings["ckpt"] = str(Path(cell["run_dir"]) / "checkpoints" / "last.ckpt")
    settings["out"] = str(Path(cell["run_dir"]) / "sweep")
    settings["cell"] = {k: cell[k] for k in ("cell", "gamma_init", "modality", "seed")}
    return settings


def cells(grid: dict) -> list[dict]:
    """Every cell: name, its axis values, its run dir, its full training config and its sweep config."""
    bases = {modality: load_config(base_config(grid, modality)) for modality in grid["modality"]}
    out = []
    for gamma, modality, seed in itertools.product(grid["gamma_init"], grid["modality"], grid["seeds"]):
        name = cell_name(gamma, modality, seed)
        config = copy.deepcopy(bases[modality])
        for key, value in (grid.get("overrides") or {}).items():
            set_dotted(config, key, value)
        config["seed_everything"] = int(seed)
        config.setdefault("model", {})
        config["model"]["gamma_init"] = float(gamma)
        config["model"]["modality"] = modality
        run_dir = Path(grid["out"]) / name
        config["run_dir"] = str(run_dir)
        cell = {"cell": name, "gamma_init": float(gamma), "modality": modality, "seed": int(seed),
                "run_dir": run_dir, "config": config, "base_config": describe_config(base_config(grid, modality))}
        cell["sweep"] = sweep_config(grid, cell)
        out.append(cell)
    return out


def sweep_enabled(grid: dict) -> bool:
    return bool((grid.get("sweep") or {}).get("enabled", True))


def sweep_path(config_path: str | Path) -> Path:
    """<out>/configs/<cell>.yaml -> <out>/sweeps/<cell>.yaml (the cell's sweep config, written by expand)."""
    config_path = Path(config_path)
    return config_path.parent.parent / "sweeps" / config_path.name


def expand(grid: dict) -> list[Path]:
    """Writes <out>/configs/<cell>.yaml (training) and <out>/sweeps/<cell>.yaml (tau sweep) for every cell, and
    <out>/cells.txt (one training config path a line)."""
    configs_dir, sweeps_dir = Path(grid["out"]) / "configs", Path(grid["out"]) / "sweeps"
    configs_dir.mkdir(parents=True, exist_ok=True)
    sweeps_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for cell in cells(grid):
        path = configs_dir / f"{cell['cell']}.yaml"
        header = f"# cell {cell['cell']} of experiments/grid.py (base {cell['base_config']})\n"
        path.write_text(header + yaml.safe_dump(cell["config"], sort_keys=False))
        sweep = sweep_path(path)
        if sweep_enabled(grid):  # every modality: scored with its own metric (gligen.experiments.sweep)
            sweep.write_text(f"# tau sweep of cell {cell['cell']} (experiments/grid.py sweep-cell {path})\n"
                             + yaml.safe_dump(cell["sweep"], sort_keys=False))
        else:
            sweep.unlink(missing_ok=True)
        paths.append(path)
    (Path(grid["out"]) / "cells.txt").write_text("".join(f"{p}\n" for p in paths))
    return paths


def build_toy_world_if_used(grid: dict) -> None:
    """The toy world, built when the cells train on it (gligen.toy.build.is_toy_world: their base LDM and shards
    are in toy_cache)."""
    locations = []
    for modality in dict.fromkeys(grid["modality"]):
        base = load_config(base_config(grid, modality))
        data = (base.get("data") or {}).get("init_args") or {}
        locations += [(base.get("model") or {}).get("pretrained"), data.get("train_shards"), data.get("val_shards")]
    if grid.get("toy_cache"):
        ensure_toy_world(grid["toy_cache"], grid.get("toy_config"), locations)


def submit(grid: dict, sbatch_args: list[str]) -> str:
    paths = expand(grid)
    cells_file = Path(grid["out"]) / "cells.txt"
    command = ["sbatch", "--parsable", f"--array=0-{len(paths) - 1}", *sbatch_args,
               str(grid.get("slurm_script") or "slurm/grid.sh"), str(cells_file)]
    print(" ".join(command))
    job = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().split(";")[0]
    print(f"submitted array job {job}: {len(paths)} cells -> {grid['out']}/<cell>")
    return job


def cell_of(config_path: str | Path) -> dict:
    """The cell whose training config `expand` wrote to config_path: its run dir, training config and sweep config
    (as `cells` gives them), read back from <out>/configs and <out>/sweeps."""
    config = yaml.safe_load(Path(config_path).read_text())
    sweep = sweep_path(config_path)
    return {"cell": Path(config_path).stem, "run_dir": Path(config["run_dir"]), "config": config,
            "sweep": yaml.safe_load(sweep.read_text()) if sweep.exists() else None}


def complete_by_marker(cell: dict, fit_args: list[str] = ()) -> bool:
    """True when the cell (cell_of) is trained and swept by its marker (cell_status), which records the cell's own
    config: never with fit overrides, which train something else."""
    return not fit_args and cell_complete(cell, {VAL: cell["sweep"]} if cell["sweep"] else {})


def sweep_cell(config_path: str | Path, fit_args: list[str] = ()) -> Path | None:
    """The tau sweep of one trained cell, once: skipped when the cell has no sweep config, when its training is
    not finished (e.g. a Slurm task whose fit was just requeued), or when the sweep is already done (also by the
    cell's marker, without its checkpoint). Under Slurm, SIGUSR1 / SIGTERM (time limit, preemption) requeue the
    task, and the requeued task redoes the unfinished sweep. A finished sweep writes the cell's marker."""
    sweep = sweep_path(config_path)
    if not sweep.exists():
        print(f"[grid] {config_path}: no sweep config ({sweep}); nothing to sweep")
        return None
    cell = cell_of(config_path)
    if complete_by_marker(cell, fit_args):
        print(f"[grid] {config_path}: trained and swept ({CELL_DONE}); not redone")
        return Path(cell["sweep"]["out"])
    if not is_trained(config_path, fit_args):
        print(f"[grid] {config_path}: training not finished (step {trained_step(config_path)} of "
              f"{max_steps_of(config_path, fit_args)}); no sweep yet")
        return None
    _requeue_on_signal()
    out = sweep_checkpoint(cell["sweep"], resume=True, provenance=sweep_provenance(cell["sweep"]["cell"]))
    if not fit_args:
        mark_complete(cell, {VAL: cell["sweep"]})
    return out


def sweep_provenance(cell: dict) -> dict:
    """The columns a cell's sweep rows get besides their own: the cell's axes (its seed as train_seed)."""
    return {"cell": cell["cell"], "gamma_init": cell["gamma_init"], "modality": cell["modality"],
            "train_seed": cell["seed"]}


def _requeue_on_signal() -> None:
    """During a cell's sweep (no checkpoint to save: a sweep is redone as a whole), SIGUSR1 or SIGTERM requeue the
    task at once; a requeue that cannot happen exits EXIT_INTERRUPTED naming the reason."""
    import os
    import signal

    job = slurm_job_id()
    if not job:
        return

    def handler(signum, frame):
        name = signal.Signals(signum).name
        reason = requeue_slurm_job(job)
        if reason is None:
            print(f"[grid] {name} during the sweep: requeued {job}; the sweep is redone when it restarts", flush=True)
            os._exit(0)
        print(f"[grid] {name} during the sweep and NOT requeued ({reason}); run the cell again", flush=True)
        os._exit(EXIT_INTERRUPTED)

    for signum in PREEMPTION_SIGNALS:
        signal.signal(signum, handler)


def run_local(grid: dict, sweep: bool | None = None) -> list[Path]:
    """Trains every cell here (skipping finished ones), then sweeps it (unless sweep is off) on its val layouts and
    on each of the grid's `evaluations` (name -> sweep keys: another layout set, into <run_dir>/sweep_<name>), then
    writes the cell's marker; a cell complete by its marker is skipped whole. Returns the checkpoints of the cells
    it trained or found trained."""
    sweep = sweep_enabled(grid) if sweep is None else sweep
    build_toy_world_if_used(grid)
    checkpoints = []
    for path, cell in zip(expand(grid), cells(grid)):
        sweeps = cell_sweeps(cell, grid.get("evaluations"), sweep)
        if cell_complete(cell, sweeps):
            print(f"[grid] {cell['cell']}: trained and swept ({CELL_DONE}); not redone")
            continue
        if is_trained(path):
            print(f"[grid] {path}: training finished; not retrained")
            checkpoints.append(cell["run_dir"] / "checkpoints" / "last.ckpt")
        else:
            checkpoints.append(fit_from_config(str(path)))
        if sweep:
            sweep_cell(path)
        for name, settings in sweeps.items():
            if name != VAL:
                sweep_checkpoint(settings, resume=True, provenance={**sweep_provenance(cell), "evaluation": name})
        if set(sweeps) != {VAL}:  # sweep_cell marked a cell whose only sweep is its val sweep
            mark_complete(cell, sweeps)
    return checkpoints


def _number(text: str | None) -> float | None:
    """A metric read back from a CSV: float, or None when empty / nan / not a number."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


SWEEP_KEEP = ("tau", "seed", "git_commit", "config_hash", "num_images")  # columns of a sweep row kept besides metrics


def collect(grid: dict) -> Path:
    """<out>/summary.csv: one row per cell x tau x sampling seed (one row with an empty tau for a cell without a
    finished sweep), with the cell's axes, its training summary, git commit and config hashes; then
    <out>/grounding_vs_tau.png, <out>/tensorboard (HParams: one run per row) and <out>/summary.md (95% intervals)."""
    rows, commit = [], git_commit()
    done = swept = 0
    grid_cells = cells(grid)
    for cell in grid_cells:
        train = training_summary(cell, commit, cell_sweeps(cell, grid.get("evaluations"), sweep_enabled(grid)))
        done += train["status"] == "done"
        out = Path(cell["sweep"]["out"])
        # a sweep counts only if it scored these very weights (not an earlier checkpoint of a cell trained on since)
        current = train["status"] == "done" and sweep_done(out, identity={"weights_hash": train["weights_hash"]})
        sweep_rows = read_rows(out / "metrics.csv") if current and (out / "metrics.csv").exists() else []
        swept += bool(sweep_rows)
        base = {**{k: train[k] for k in ("cell", "gamma_init", "modality", "seed")}, "tau": None,
                "sample_seed": None, "sweep_status": "done" if sweep_rows else "missing"}
        training = {k: v for k, v in train.items() if k not in base and k not in ("git_commit", "config_hash")}
        provenance = {"config_hash": train["config_hash"], "sweep_config_hash": None, "git_commit": commit}
        if not sweep_rows:
            rows.append({**base, **training, **provenance})
            continue
        metrics = [m for m in reporting.beta_metrics() if m in sweep_rows[0]]  # the cell's modality's metrics
        for sweep_row in sweep_rows:
            rows.append({**base, "tau": float(sweep_row["tau"]), "sample_seed": int(sweep_row["seed"]),
                         **{m: _number(sweep_row[m]) for m in metrics}, "num_images": sweep_row.get("num_images"),
                         **training, "config_hash": train["config_hash"],
                         "sweep_config_hash": sweep_row.get("config_hash"),
                         "git_commit": sweep_row.get("git_commit") or commit,
                         **({RECORDS: sweep_row[RECORDS]} if RECORDS in sweep_row else {})})
    # cells of different modalities report different metrics: every row gets every metric column (empty where
    # its modality does not measure it), in reporting.beta_metrics() order after the axes
    measured = {k for row in rows for k in row}
    columns = [m for m in reporting.beta_metrics() if m in measured]
    rows = [_with_metric_columns(row, columns) for row in rows]
    path = Path(grid["out"]) / "summary.csv"
    write_rows(rows, path)
    reporting.write_grid_report(Path(grid["out"]), rows)
    reporting.write_grid_summary(Path(grid["out"]), rows, reporting.command_line())
    print(f"wrote {path} ({done}/{len(grid_cells)} cells trained, {swept} swept; {len(rows)} rows)")
    return path


def _with_metric_columns(row: dict, columns: list[str]) -> dict:
    """`row` with every metric column of `columns` right after its axes (sweep_status), None where it has none."""
    out = {}
    for key, value in row.items():
        if key in columns:
            continue
        out[key] = value
        if key == "sweep_status":
            out.update({m: row.get(m) for m in columns})
    return out


COMMANDS = ("expand", "submit", "run-local", "collect", "trained", "sweep-cell")


def parse_args(argv=None):
    """`<command> [CELL_CONFIG] [settings]`: trained / sweep-cell take the cell's config and pass every argument
    after it to fit (grid.sh's overrides); submit passes the arguments after `--` to sbatch."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else None
    cell_config, extra = None, []
    if command in ("trained", "sweep-cell"):
        if not argv or argv[0].startswith("-"):
            raise SystemExit(f"grid.py {command} needs the cell's config path (<out>/configs/<cell>.yaml)")
        cell_config, extra, argv = argv[0], argv[1:], []
    elif "--" in argv:
        argv, extra = argv[: argv.index("--")], argv[argv.index("--") + 1:]
    grid = load_grid(argv=argv)  # --print_config / --help exit here
    if command is None:
        raise SystemExit(f"grid.py: give a command first: one of {', '.join(COMMANDS)}")
    if extra and command != "submit" and cell_config is None:
        raise SystemExit(f"grid.py {command}: unrecognized arguments: {extra}")
    return command, grid, extra, cell_config


def main(argv=None) -> None:
    command, grid, extra, cell_config = parse_args(argv)
    if command == "expand":
        print("\n".join(str(p) for p in expand(grid)))
    elif command == "submit":
        submit(grid, extra)
    elif command == "run-local":
        run_local(grid)
        collect(grid)
    elif command == "trained":  # extra: the fit overrides grid.sh passes on (a --trainer.max_steps among them)
        raise SystemExit(0 if is_trained(cell_config, extra) or complete_by_marker(cell_of(cell_config), extra) else 1)
    elif command == "sweep-cell":
        sweep_cell(cell_config, extra)
    else:
        collect(grid)


if __name__ == "__main__":
    main()
