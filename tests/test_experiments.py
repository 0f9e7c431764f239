"""Every experiment script runs end to end at test size (the lightning-hydra-template habit)."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gligen.toy.build import ToyBuildConfig
from tests.test_toy_build import TINY

ROOT = Path(__file__).resolve().parents[1]


def tiny_toy_config(tmp_path: Path) -> Path:
    config = {"resolution": 32, "shard_size": 16,
              "splits": {"train": {"grounding": 24, "detection": 8, "detection_caption": 8}, "val": {"grounding": 8}},
              "pretrain": {k: list(v) if isinstance(v, tuple) else v for k, v in TINY.__dict__.items()}}
    path = tmp_path / "toy_world.yaml"
    path.write_text(yaml.safe_dump(config))
    ToyBuildConfig.from_yaml(path)  # the experiment reads it the same way
    return path


def tiny_train_config(tmp_path: Path, cache: Path) -> Path:
    config = yaml.safe_load((ROOT / "experiments/configs/toy_box.yaml").read_text())
    config["run_dir"] = str(tmp_path / "runs/toy_box")
    config["trainer"].update(max_steps=2, limit_val_batches=1, val_check_interval=2, log_every_n_steps=1)
    config["trainer"]["callbacks"] = [c for c in config["trainer"]["callbacks"] if "SampleGrid" not in c["class_path"]]
    config["model"]["pretrained"] = str(cache / "ldm")
    data = config["data"]["init_args"]
    data["train_shards"] = {k: str(cache / "shards" / f"train-{k}") for k in data["train_shards"]}
    data["val_shards"] = str(cache / "shards/val-grounding")
    data.update(batch_size=4, num_workers=0, batches_per_epoch=2)
    path = tmp_path / "toy_box.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_ablate_beta_runs_end_to_end_on_a_tiny_toy_world(tmp_path):
    cache = tmp_path / "cache"
    overrides = {"toy_cache": str(cache), "toy_config": str(tiny_toy_config(tmp_path)),
                 "train_config": None, "out": str(tmp_path / "results"), "taus": [0.0, 1.0], "seeds": [0, 1],
                 "num_images": 8, "steps": 2, "batch_size": 4}
    # the train config needs the cache paths, which exist only after the build: write it now, paths are fixed
    overrides["train_config"] = str(tiny_train_config(tmp_path, cache))
    config = tmp_path / "ablate.yaml"
    config.write_text(yaml.safe_dump(overrides))
    subprocess.run([sys.executable, str(ROOT / "experiments/ablate_beta.py"), "--config", str(config)],
                   check=True, cwd=tmp_path)
    out = tmp_path / "results"
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [(float(r["tau"]), int(r["seed"])) for r in rows] == [(0.0, 0), (0.0, 1), (1.0, 0), (1.0, 1)]
    for row in rows:
        assert row["git_commit"] and row["config_hash"] and 0 <= float(row["ap50"]) <= 1 and float(row["fid"]) >= 0
    summary = (out / "summary.md").read_text()
    assert "| 0.0 | 2 |" in summary or "| 0 | 2 |" in summary
    assert (out / "ap_fid_vs_tau.png").stat().st_size > 0 and (out / "samples_tau1.png").exists()
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert json.loads((out / "config.json").read_text())["num_images"] == 8
