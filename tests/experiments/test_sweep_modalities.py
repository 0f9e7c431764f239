"""The tau sweep (gligen.experiments.sweep.sweep_checkpoint) for every grounding modality: keypoint and image
checkpoints are sampled on their own validation layouts (person shards; object shards with entity images) and scored
with their own metric, and experiments/grid.py sweeps and collects cells of every modality."""

import csv
import json
from pathlib import Path

import pytest
import yaml

import gligen.experiments.grid as grid_lib
from gligen.evaluation.reporting import beta_metrics, primary_metric
from tests.helpers import ROOT, build_tiny_toy_world, tiny_train_config

MODALITIES = ("keypoint", "image")
OWN_METRICS = {"keypoint": ("pck", "oks_ap", "oks_ap50", "oks_ap75", "person_ap50", "person_miou"),
               "image": ("entity_ap", "entity_ap50", "entity_ap75", "entity_miou", "entity_coarse_ap50",
                         "entity_coarse_miou")}
BOX_METRICS = ("ap", "ap50", "ap75", "miou", "coarse_ap50", "coarse_miou")


def test_primary_metric_follows_the_modality():
    assert primary_metric({"ap50": 0.5, "coarse_ap50": 0.7, "fid": 1.0}) == "coarse_ap50"  # no column: a box row
    assert primary_metric({"modality": "box", "ap50": 0.5, "fid": 1.0}) == "ap50"
    assert primary_metric({"modality": "keypoint", "pck": 0.5, "oks_ap": 0.1, "fid": 1.0}) == "pck"
    assert primary_metric({"modality": "keypoint", "pck": 0.5, "person_ap50": 0.8}) == "person_ap50"
    assert primary_metric({"modality": "image", "entity_ap50": 0.5, "entity_miou": 0.1}) == "entity_ap50"
    assert primary_metric({"modality": "text_image", "entity_ap50": 0.5, "entity_coarse_ap50": 0.7}) \
        == "entity_coarse_ap50"
    assert all(m in beta_metrics() for ms in OWN_METRICS.values() for m in ms)
    with pytest.raises(ValueError, match="no grounding metric"):
        primary_metric({"fid": 1.0})
    with pytest.raises(ValueError, match="no grounding metric of keypoint"):  # another modality's metric is no use
        primary_metric({"modality": "keypoint", "ap50": 0.5})


def test_grid_sweeps_every_modality_from_its_own_val_shards(tmp_path):
    grid = grid_lib.load_grid(out=str(tmp_path / "grid"), modality=["box", "keypoint", "image"], gamma_init=[1.0],
                              seeds=[0])
    grid["base_configs"] = {m: [str(ROOT / "experiments/configs/toy_base.yaml"),
                                str(ROOT / f"experiments/configs/toy_{m}.yaml")] for m in grid["modality"]}
    paths = grid_lib.expand(grid)
    sweeps = {p.stem: yaml.safe_load(grid_lib.sweep_path(p).read_text()) for p in paths}
    assert set(sweeps) == {"gamma1_box_seed0", "gamma1_keypoint_seed0", "gamma1_image_seed0"}
    assert sweeps["gamma1_keypoint_seed0"]["val_shards"] == "cache/toy/shards/val-persons"
    assert sweeps["gamma1_image_seed0"]["val_shards"] == "cache/toy/shards/val-grounding"
    assert sweeps["gamma1_image_seed0"]["cell"]["modality"] == "image"
    assert "entity_resolution" not in sweeps["gamma1_box_seed0"]  # box sweep configs (and their hashes) as before


@pytest.fixture(scope="module")
def swept_grid(tmp_path_factory):
    """A tiny toy world, and a grid of one keypoint and one image cell (gamma_init 1, seed 0), each trained for one
    step and swept over 2 taus x 1 seed on 4 validation layouts with sweep_checkpoint."""
    from gligen.experiments.sweep import sweep_checkpoint
    from gligen.training.cli import fit_from_config

    root = tmp_path_factory.mktemp("sweep_modalities")
    cache = build_tiny_toy_world(root)
    grid = {"base_configs": {m: str(tiny_train_config(root, cache, m, steps=1, validate=False)) for m in MODALITIES},
            "base_config": None, "out": str(root / "grid"), "gamma_init": [1.0], "modality": list(MODALITIES),
            "seeds": [0], "toy_cache": None, "overrides": {},
            "sweep": {"enabled": True, "taus": [0.0, 1.0], "seeds": [0], "num_images": 4, "sampler": "ddim",
                      "steps": 2, "guidance": 2.0, "batch_size": 4, "detector": "toy"}}
    for path in grid_lib.expand(grid):
        fit_from_config(str(path))
        config = yaml.safe_load(grid_lib.sweep_path(path).read_text())
        cell = config["cell"]
        sweep_checkpoint(config, resume=True, provenance={"cell": cell["cell"], "gamma_init": cell["gamma_init"],
                                                          "modality": cell["modality"], "train_seed": cell["seed"]})
    return grid


@pytest.mark.slow
@pytest.mark.parametrize("modality", MODALITIES)
def test_sweep_checkpoint_scores_each_modality_with_its_own_metric(swept_grid, modality):
    out = Path(swept_grid["out"]) / f"gamma1_{modality}_seed0" / "sweep"
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [(float(r["tau"]), int(r["seed"])) for r in rows] == [(0.0, 0), (1.0, 0)]
    for row in rows:
        for metric in OWN_METRICS[modality]:
            assert 0 <= float(row[metric]) <= 1, (metric, row)
        assert not set(BOX_METRICS) & set(row), row  # no box AP for a keypoint / image model
        assert float(row["fid"]) >= 0 and row["modality"] == modality and row["num_images"] == "4"
        assert row["git_commit"] and row["config_hash"]
    summary = (out / "summary.md").read_text()
    primary = {"keypoint": "person_ap50", "image": "entity_coarse_ap50"}[modality]  # placement, where measured
    assert f"Grounding metric ({modality}): {primary}" in summary and f"| {primary} |" in summary
    assert (out / "ap_fid_vs_tau.png").stat().st_size > 0 and (out / "samples_tau1.png").exists()
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert json.loads((out / "sweep_done.json").read_text())["global_step"] == 1


@pytest.mark.slow
def test_grid_collect_has_every_modalitys_metric_columns(swept_grid):
    path = grid_lib.collect(swept_grid)
    with path.open() as f:
        reader = csv.DictReader(f)
        columns, rows = reader.fieldnames, list(reader)
    assert sorted((r["modality"], float(r["tau"])) for r in rows) == [
        (m, t) for m in sorted(MODALITIES) for t in (0.0, 1.0)]
    for metric in (*OWN_METRICS["keypoint"], *OWN_METRICS["image"], "fid", "kid"):
        assert metric in columns
    assert columns.index("sweep_status") < columns.index("pck") < columns.index("entity_ap50") < \
        columns.index("fid")
    for row in rows:
        assert row["sweep_status"] == "done" and float(row["fid"]) >= 0
        other = "image" if row["modality"] == "keypoint" else "keypoint"
        assert all(row[m] != "" for m in OWN_METRICS[row["modality"]])
        assert all(row[m] == "" for m in OWN_METRICS[other])  # the other modality's metrics: empty
    out = Path(swept_grid["out"])
    assert (out / "grounding_vs_tau.png").stat().st_size > 0
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
