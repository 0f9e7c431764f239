"""Is a grid cell (experiments/grid.py, ablate_gamma, the claims' arms) trained and swept? From its checkpoint, or,
in a clone of committed results without the git-ignored checkpoints, from its marker.

`<run_dir>/cell_done.json` is written once a cell's sweeps are all done on one set of weights (no sweeps: once it is
trained): the hash of the cell's training config, those weights' hash and step, the base LDM's fingerprint, each
sweep's config hash. A cell is complete when its marker records the cell's training config and the base LDM it
would train on now, and every sweep asked for is still done on those weights. A rerun (`grid.py run-local`,
`grid.py trained` / `sweep-cell` in a Slurm task, ablate_gamma, ablate_claims) then neither trains nor sweeps it,
and `collect` reports its training from the marker. A marker never overrules a checkpoint: one on disk with other
weights (trained further since) makes the cell incomplete; nor does it stand in for one: a sweep that is not done
(a new evaluation, other sampling settings) needs the checkpoint, and the cell is trained again without it.

Also here: `training_summary` (one cell's training, a row of grid.py's summary.csv) and `scalars` (its TensorBoard
scalars).
"""

from __future__ import annotations

import json
from pathlib import Path

from gligen.checkpoint_file import checkpoint_identity
from gligen.evaluation.results import read_csv
from gligen.experiments.sweep import DONE, sweep_done
from gligen.ldm import weights_fingerprint
from gligen.provenance import config_hash

CELL_DONE = "cell_done.json"
VAL = "val"  # the name of a cell's own sweep (its val layouts, <run_dir>/sweep) among its sweeps


def evaluation_sweep(cell: dict, name: str, settings: dict) -> dict:
    """A cell's sweep on another layout set: its own sweep config with the evaluation's keys, into sweep_<name>."""
    return {**cell["sweep"], **settings, "out": str(Path(cell["run_dir"]) / f"sweep_{name}")}


def cell_sweeps(cell: dict, evaluations: dict | None = None, sweep: bool = True) -> dict[str, dict]:
    """Every sweep config of a cell: its val sweep and one per evaluation (name -> keys); none when sweep is off."""
    if not sweep:
        return {}
    return {VAL: cell["sweep"], **{name: evaluation_sweep(cell, name, settings or {})
                                   for name, settings in (evaluations or {}).items()}}


def read_marker(cell: dict) -> dict | None:
    marker = Path(cell["run_dir"]) / CELL_DONE
    return json.loads(marker.read_text()) if marker.exists() else None


def _sweep_record(sweep: dict) -> dict:
    return json.loads((Path(sweep["out"]) / DONE).read_text())


def trained_base(cell: dict, marker: dict) -> str | None:
    """Fingerprint of the base LDM the cell's model was trained on: its marker's, or (markers written before it
    was recorded there) its val sweep's rows'."""
    if marker.get("base_fingerprint"):
        return marker["base_fingerprint"]
    path = Path(cell["sweep"]["out"]) / "metrics.csv"
    rows = read_csv(path) if path.exists() else []
    return (rows[0].get("ckpt_base_fingerprint") or None) if rows else None


def cell_complete(cell: dict, sweeps: dict[str, dict]) -> bool:
    """True when the cell's marker records this training config and base LDM, the cell's checkpoint (when there
    is one) holds the marker's weights, and every sweep of `sweeps` is done (same sweep config) on those weights."""
    marker = read_marker(cell)
    if marker is None or marker.get("train_config_hash") != config_hash(cell["config"]):
        return False
    base = (cell["config"].get("model") or {}).get("pretrained")
    if base and trained_base(cell, marker) != weights_fingerprint(str(base)):  # the same config on another base (a
        return False                                                           # rebuilt toy world): train again
    last = Path(cell["run_dir"]) / "checkpoints" / "last.ckpt"
    if last.exists() and checkpoint_identity(last)["weights_hash"] != marker.get("weights_hash"):
        return False  # a checkpoint on disk decides: it was trained further (or replaced) since the marker
    identity = {"weights_hash": marker.get("weights_hash")}
    return all(sweep_done(sweep["out"], sweep, identity) for sweep in sweeps.values())


def mark_complete(cell: dict, sweeps: dict[str, dict]) -> bool:
    """Writes the cell's marker when every sweep of `sweeps` is done on the same weights (no sweeps: when its
    checkpoint reached max_steps); returns whether it did."""
    last = Path(cell["run_dir"]) / "checkpoints" / "last.ckpt"
    identity = checkpoint_identity(last) if last.exists() else {}
    if sweeps:
        if not all(sweep_done(s["out"], s) for s in sweeps.values()):
            return False
        records = [_sweep_record(s) for s in sweeps.values()]
        if len({r["weights_hash"] for r in records}) != 1:  # swept on different weights: not one model's results
            return False
        weights, step = records[0]["weights_hash"], records[0].get("global_step")
    elif identity.get("complete"):
        weights, step = identity["weights_hash"], identity["global_step"]
    else:
        return False
    base = identity.get("base_fingerprint") if identity.get("weights_hash") == weights else None
    (Path(cell["run_dir"]) / CELL_DONE).write_text(json.dumps(
        {"train_config_hash": config_hash(cell["config"]), "weights_hash": weights, "global_step": step,
         "base_fingerprint": base or trained_base(cell, {}),
         "sweeps": {name: config_hash(s) for name, s in sweeps.items()}}, indent=1))
    return True


def marker_step(cell: dict, marker: dict) -> int | None:
    """The training step of a marker's weights (markers without one: the step the val sweep records)."""
    if marker.get("global_step") is not None:
        return int(marker["global_step"])
    done = Path(cell["sweep"]["out"]) / DONE
    return json.loads(done.read_text()).get("global_step") if done.exists() else None


# ----- one cell's training, for summaries -------------------------------------------------------------------------
def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard scalars of a run directory: tag -> [(step, value)] (all event files, in step order)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for events in sorted(Path(run_dir).glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in accumulator.Scalars(tag)})
    return {tag: sorted(values.items()) for tag, values in out.items()}


def mean_last(series: list[tuple[int, float]], n: int = 10) -> float | None:
    values = [v for _, v in series[-n:]]
    return sum(values) / len(values) if values else None


def training_summary(cell: dict, commit: str, sweeps: dict[str, dict] | None = None) -> dict:
    """One cell's training: status (done / partial / missing), final step, weights hash, losses and gate values
    (from its checkpoint, or from its marker when the checkpoint is absent and the cell is complete for `sweeps`;
    and TensorBoard); `trained_from` says which."""
    run_dir = Path(cell["run_dir"])
    row = {k: cell[k] for k in ("cell", "gamma_init", "modality", "seed")}
    last = run_dir / "checkpoints" / "last.ckpt"
    target = (cell["config"].get("trainer") or {}).get("max_steps")
    if last.exists():
        identity, source = checkpoint_identity(last), "checkpoint"
    elif cell_complete(cell, sweeps or {}):
        marker = read_marker(cell)
        identity, source = {"global_step": marker_step(cell, marker), "weights_hash": marker["weights_hash"]}, CELL_DONE
    else:
        identity, source = {}, None
    step = identity.get("global_step")
    # done only at the cell's own max_steps: a checkpoint of a run still going (or cut short) is "partial"
    row["status"] = "missing" if step is None else "done" if target is None or target < 0 or step >= target \
        else "partial"
    row["global_step"] = step
    row["max_steps"] = target
    row["weights_hash"] = identity.get("weights_hash")
    row["trained_from"] = source
    series = scalars(run_dir) if run_dir.exists() else {}
    row["train_loss_last10"] = mean_last(series.get("train/loss", []))
    row["val_loss_last"] = mean_last(series.get("val/loss", []), 1)
    for kind in ("gate_attn", "gate_dense"):
        finals = [s[-1][1] for tag, s in series.items() if tag.startswith(kind + "/") and s]
        row[f"{kind}_mean_final"] = sum(finals) / len(finals) if finals else None
    row["run_dir"] = str(run_dir)
    row["config_hash"] = config_hash(cell["config"])
    row["git_commit"] = commit
    return row
