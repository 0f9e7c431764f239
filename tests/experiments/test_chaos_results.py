"""Results never come from the wrong checkpoint (#17, item 5): a sweep of a checkpoint trained further since is
redone, a half-trained checkpoint is never scored as finished, and every sweep row names the checkpoint's step and
weights hash."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

import gligen.experiments.grid as grid_lib
from gligen.checkpoint_file import checkpoint_identity, weights_hash
from gligen.experiments.modality_models import checkpoint_for
from gligen.training.cli import fit_from_config
from tests.helpers import tiny_grid_config

pytestmark = [pytest.mark.chaos, pytest.mark.slow]


def one_cell_grid(tmp_path: Path, cache: Path) -> tuple[dict, Path]:
    grid = grid_lib.load_grid(str(tiny_grid_config(tmp_path, cache, tmp_path / "grid")), gamma_init=[1.0])
    (path,) = grid_lib.expand(grid)
    return grid, path


def summary_rows(grid: dict) -> list[dict]:
    with grid_lib.collect(grid).open() as f:
        return list(csv.DictReader(f))


def test_weights_hash_names_the_weights():
    a = {"w": torch.ones(2, 2), "b": torch.zeros(2)}
    assert weights_hash(a) == weights_hash({"b": torch.zeros(2), "w": torch.ones(2, 2)})  # order-free
    assert weights_hash(a) != weights_hash({**a, "w": torch.ones(2, 2) + 1e-7})
    assert weights_hash(a) != weights_hash({**a, "w": torch.ones(4)})  # same bytes, other shape


def test_a_sweep_of_a_checkpoint_trained_further_is_redone(tiny_toy_world, tmp_path, chaos_outcome):
    grid, path = one_cell_grid(tmp_path, tiny_toy_world)
    fit_from_config(str(path))
    sweep_dir = grid_lib.sweep_cell(path)
    first = json.loads((sweep_dir / "sweep_done.json").read_text())
    rows = list(csv.DictReader((sweep_dir / "metrics.csv").open()))
    identity = checkpoint_identity(Path(yaml.safe_load(path.read_text())["run_dir"]) / "checkpoints" / "last.ckpt")
    assert identity["complete"] and identity["max_steps"] == 2
    assert {(r["ckpt_step"], r["ckpt_weights_hash"], r["ckpt_complete"]) for r in rows} == \
        {("2", identity["weights_hash"], "True")}

    # trained on (same config, a higher max_steps): the old sweep no longer describes last.ckpt
    fit_from_config(str(path), "--trainer.max_steps", "3")
    stale = summary_rows(grid)
    assert {r["sweep_status"] for r in stale} == {"missing"} and {r["global_step"] for r in stale} == {"3"}
    sweep_dir = grid_lib.sweep_cell(path)  # not "already done": redone
    again = json.loads((sweep_dir / "sweep_done.json").read_text())
    assert again["global_step"] == 3 and again["weights_hash"] != first["weights_hash"]
    fresh = summary_rows(grid)
    assert {r["sweep_status"] for r in fresh} == {"done"}
    assert {r["weights_hash"] for r in fresh} == {again["weights_hash"]}
    chaos_outcome("results", "sweep of a checkpoint trained further since", "redone",
                  "the done marker holds the weights hash; collect ignores the stale sweep")


def test_a_sweep_of_a_checkpoint_edited_after_training_is_refused(tiny_toy_world, tmp_path, chaos_outcome):
    grid, path = one_cell_grid(tmp_path, tiny_toy_world)
    checkpoint_path = fit_from_config(str(path))
    assert checkpoint_identity(checkpoint_path)["weights_changed"] is False  # as training saved it
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    name = next(k for k in checkpoint["state_dict"] if k.endswith("alpha_attn"))
    checkpoint["state_dict"][name] = checkpoint["state_dict"][name] + 0.5  # a hand edit of one gate
    torch.save(checkpoint, checkpoint_path)
    assert checkpoint_identity(checkpoint_path)["weights_changed"] is True
    with pytest.raises(SystemExit, match="edited after training; not swept"):
        grid_lib.sweep_cell(path)
    assert not (Path(yaml.safe_load(grid_lib.sweep_path(path).read_text())["out"]) / "metrics.csv").exists()
    chaos_outcome("results", "checkpoint whose weights were edited after training", "refused",
                  "training records the weights hash on saving; the sweep compares it")


def test_a_half_trained_checkpoint_is_never_scored_as_finished(tiny_toy_world, tmp_path, chaos_outcome):
    grid, path = one_cell_grid(tmp_path, tiny_toy_world)
    fit_from_config(str(path), "--trainer.max_steps", "1")  # a run cut short at step 1 of 2
    rows = summary_rows(grid)
    assert {(r["status"], r["global_step"], r["max_steps"], r["sweep_status"]) for r in rows} == \
        {("partial", "1", "2", "missing")}
    assert grid_lib.sweep_cell(path) is None  # not swept
    # the modality ablation resumes it to its end instead of scoring it
    config = {"ckpts": {}, "train_configs": {"box": str(path)}}
    checkpoint = checkpoint_for("box", config)
    assert checkpoint_identity(checkpoint)["global_step"] == 2
    chaos_outcome("results", "half-trained checkpoint (run cut short)", "refused",
                  "collect: status partial, no sweep; modality ablation resumes it to max_steps first")
