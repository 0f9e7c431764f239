"""The paper's design claims as experiment arms, on the toy world by default:

    python experiments/ablate_claims.py                       # every arm x training seed, sweeps, summary
    python experiments/ablate_claims.py --seeds [0] --overrides '{trainer.max_steps: 200}'   # a quick look

Each arm is a training config (`base_config` + `overrides` + the arm's own dotted keys), trained once per training
seed as the cells of a grid (experiments/grid.py machinery: <out>/<arm>/<cell>, resumable, finished cells skipped;
a cell trained and swept gets <run_dir>/cell_done.json, so a clone of committed results, without the git-ignored
checkpoints, skips it too),
each model swept over tau on its val layouts (`val`) and on every layout set of `evaluations` (e.g. the held-out
colour-shape pairs `ood`, or layouts that ask for a background style), in <run_dir>/sweep and
<run_dir>/sweep_<evaluation>. A claim compares two (arm, evaluation, tau) on a metric: a - b with its 95% bootstrap
interval (gligen.evaluation.stats: over training seeds and layouts; paired when both sides are the same models,
i.e. the same arm), and a verdict against the paper's direction. Writes <out>/metrics.csv (every sweep row with its
arm and evaluation, and layout records), <out>/config.json and <out>/summary.md (the claims table, then each arm's
metrics at the largest tau). Settings: ClaimsConfig (gligen/experiments/config.py), defaults
experiments/configs/ablate_claims.yaml.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gligen.evaluation import stats
from gligen.evaluation.reporting import command_line, summary_marker
from gligen.evaluation.results import commits, read_rows, write_rows
from gligen.experiments import cell_status
from gligen.experiments import grid as grid_lib
from gligen.experiments.cell_status import VAL, evaluation_sweep
from gligen.experiments.config import ClaimsConfig, parse, to_dict
from gligen.training.rundir import config_paths, load_config


def arm_grid(config: dict, arm: str) -> dict:
    """The grid of one arm: its cells are the training seeds of the base config with the arm's keys set (its
    gamma_init, when it sets one, is the grid's gamma axis), trained into <out>/<arm>."""
    keys = {**(config.get("overrides") or {}), **(config["arms"][arm] or {})}
    base = load_config(config_paths(config["base_config"]))
    model = base.get("model") or {}
    gamma = keys.pop("model.gamma_init", model.get("gamma_init", 0.0))
    modality = keys.pop("model.modality", model.get("modality", "box"))
    return {"base_config": config["base_config"], "base_configs": {}, "out": str(Path(config["out"]) / arm),
            "gamma_init": [float(gamma)], "modality": [modality], "seeds": list(config["seeds"]), "overrides": keys,
            "sweep": {**{k: v for k, v in config["sweep"].items()
                         if v is not None or k not in grid_lib.OPTIONAL_SWEEP_KEYS}, "enabled": True},
            "evaluations": config.get("evaluations") or {},
            "toy_cache": config.get("toy_cache"),
            "toy_config": config.get("toy_config")}


def sweep_dirs(config: dict) -> list[tuple[str, str, dict, Path]]:
    """(arm, evaluation, cell, sweep directory) of every sweep of the experiment."""
    found = []
    for arm in config["arms"]:
        for cell in grid_lib.cells(arm_grid(config, arm)):
            found.append((arm, VAL, cell, Path(cell["sweep"]["out"])))
            for name, settings in (config.get("evaluations") or {}).items():
                found.append((arm, name, cell, Path(evaluation_sweep(cell, name, settings)["out"])))
    return found


def cell_sweeps(config: dict, cell: dict) -> dict[str, dict]:
    """Every sweep config of a cell: its val sweep and one per evaluation."""
    return cell_status.cell_sweeps(cell, config.get("evaluations"))


def cell_complete(config: dict, cell: dict) -> bool:
    """True when the cell is trained and swept on every evaluation, by its marker (cell_status): checkpoints are
    not committed (git-ignored), the sweeps and markers are, so a clone or a later session skips finished cells."""
    return cell_status.cell_complete(cell, cell_sweeps(config, cell))


def run(config: dict) -> None:
    """Train and sweep every arm's cells, on every evaluation (grid.run_local: cells whose marker says they are
    done are skipped, as are finished trainings and sweeps; a cell's marker is written once all its sweeps are
    done)."""
    for arm in config["arms"]:
        print(f"[claims] arm {arm}")
        grid_lib.run_local(arm_grid(config, arm))


def pooled_rows(config: dict) -> list[dict]:
    """Every sweep row with its arm, evaluation and training seed (and its layout records)."""
    rows = []
    for arm, evaluation, cell, folder in sweep_dirs(config):
        if (folder / "metrics.csv").exists():
            rows += [{**r, "arm": arm, "evaluation": evaluation, "train_seed": cell["seed"]}
                     for r in read_rows(folder / "metrics.csv")]
    return rows


def _side(rows: list[dict], side: dict) -> list[dict]:
    evaluation = side.get("evaluation", VAL)
    return [r for r in rows if r["arm"] == side["arm"] and r["evaluation"] == evaluation
            and float(r["tau"]) == float(side["tau"])]


def claim_result(rows: list[dict], claim: dict) -> dict:
    """a - b of the claim's metric with its interval, paired when both sides are the same models (one arm), and the
    verdict: with `expect: greater` (the paper: a > b) agrees / disagrees when the interval excludes 0 on that /
    the other side, else inconclusive; `expect: none`, measured (the paper gives no direction)."""
    a, b = _side(rows, claim["a"]), _side(rows, claim["b"])
    if not a or not b:
        return {"verdict": "not run", "reason": f"no rows for {claim['a'] if not a else claim['b']}"}
    same_models = claim["a"]["arm"] == claim["b"]["arm"]
    sides = [{**r, "side": "a"} for r in a] + [{**r, "side": "b"} for r in b]
    found = stats.compare(sides, "side", "b", "a", claim["metric"], paired=None if same_models else False)
    low, high = found["low"], found["high"]
    if claim.get("expect", "greater") == "none":
        verdict, reason = "measured", "the paper gives no direction to test"
    elif low > 0:
        verdict, reason = "agrees", "the interval of a - b lies above 0, as the paper's a > b"
    elif high < 0:
        verdict, reason = "disagrees", "the interval of a - b lies below 0, against the paper's a > b"
    else:
        verdict, reason = "inconclusive", "the interval of a - b holds 0"
    reason += (f"; {found['n_train']} training seeds, " + ("paired (the same models at both)" if found["paired"]
                                                           else "unpaired (different models)") +
               (", layouts resampled" if found["layouts_resampled"] else ""))
    return {**found, "verdict": verdict, "reason": reason}


def _name(side: dict) -> str:
    return f"{side['arm']} / {side.get('evaluation', VAL)} / tau {float(side['tau']):g}"


def summary_text(rows: list[dict], config: dict) -> str:
    """summary.md from the pooled rows (metrics.csv) and config (config.json) alone."""
    lines = ["# The paper's claims on the toy world", "", f"Command: `{config.get('command') or command_line()}`", "",
             f"git commits: {commits(sorted({str(r['git_commit']) for r in rows}))}; training "
             f"seeds {sorted({int(r['train_seed']) for r in rows})}; every arm: `{config['base_config']}` + "
             f"`{json.dumps(config.get('overrides') or {})}` + its own keys.", "",
             "| claim | paper | metric | a - b [95% interval] | verdict | why |", "|---|---|---|---|---|---|"]
    for claim in config.get("claims") or []:
        result = claim_result(rows, claim)
        value = (f"{result['difference']:+.3f} [{result['low']:+.3f}, {result['high']:+.3f}]"
                 if "difference" in result else "")
        lines.append(f"| {claim['claim']} (a = {_name(claim['a'])}, b = {_name(claim['b'])}) | {claim.get('paper', '')}"
                     f" | {claim['metric']} | {value} | {result['verdict']} | {result['reason']} |")
    lines += [""]
    top = max((float(r["tau"]) for r in rows), default=None)
    for evaluation in dict.fromkeys(r["evaluation"] for r in rows):
        mine = [r for r in rows if r["evaluation"] == evaluation and float(r["tau"]) == top]
        metrics = [m for m in ("coarse_ap50", "ap50", "style_adherence", "fidelity_error", "fid")
                   if any(r.get(m) not in (None, "") for r in mine)]
        if mine and metrics:
            lines += [f"## Arms on `{evaluation}` layouts at tau = {top:g} (mean over training seeds ± their std "
                      "[95% interval])", "", stats.interval_table(mine, "arm", metrics), ""]
    arms = config.get("arms") or {}
    lines += ["Arms: " + "; ".join(f"`{arm}` = `{json.dumps(keys or {})}`" for arm, keys in arms.items()) + ".", "",
              summary_marker("claims"), ""]
    return "\n".join(lines)


def write_summary(config: dict) -> Path:
    out = Path(config["out"])
    out.mkdir(parents=True, exist_ok=True)
    rows = pooled_rows(config)
    write_rows(rows, out / "metrics.csv")
    (out / "config.json").write_text(json.dumps(config, indent=1, default=str))
    (out / "summary.md").write_text(summary_text(rows, config))
    return out / "summary.md"


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    config = to_dict(parse(ClaimsConfig, argv, name="ablate_claims", description=__doc__))
    config["command"] = command_line()
    run(config)
    print(f"wrote {write_summary(config)}")
