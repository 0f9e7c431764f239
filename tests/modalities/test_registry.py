"""A new grounding modality is one registered class: this file adds a fifth one ("box_only": boxes without phrases,
its own tokenizer and metric names) and trains, samples and scores it through the normal CLI paths, with nothing
outside this file changed for it."""

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from gligen.constants import MAX_OBJECTS, MAX_PERSONS
from gligen.evaluation import sample as sample_cli
from gligen.experiments.sweep import sweep_checkpoint
from gligen.metrics.detectors import make_detector
from gligen.metrics.grounding import box_grounding_metrics
from gligen.modalities import Modality, get_modality, modality_names, register_modality, unregister_modality
from gligen.modalities.box import box_detector, layout_boxes
from gligen.nn.fourier import fourier_dim, fourier_embed
from gligen.nn.tokenizers import check_box_grounding
from gligen.provenance import config_hash, git_commit
from gligen.training.cli import main as gligen_main
from tests.helpers import build_tiny_toy_world


class BoxOnlyTokenizer(nn.Module):
    """One token per box from its Fourier features alone (no phrase), a learned null token for padded slots."""

    def __init__(self, out_dim: int, fourier_freqs: int = 4):
        super().__init__()
        self.fourier_freqs = fourier_freqs
        self.linears = nn.Sequential(nn.Linear(fourier_dim(4, fourier_freqs), 32), nn.SiLU(), nn.Linear(32, out_dim))
        self.null_position_feature = nn.Parameter(torch.zeros(fourier_dim(4, fourier_freqs)))

    def forward(self, boxes, masks):
        m = masks.unsqueeze(-1)
        position = fourier_embed(boxes, self.fourier_freqs) * m + (1 - m) * self.null_position_feature
        return self.linears(position)


class BoxOnlyModality(Modality):
    name = "box_only"
    primary_metric = "box_only_ap50"
    placement_metric = "box_only_coarse_ap50"
    metric_names = ("box_only_ap50", "box_only_miou", "box_only_coarse_ap50")

    def position_net(self, token_dim, text_dim, max_persons=MAX_PERSONS):
        return BoxOnlyTokenizer(token_dim)

    def check_batch(self, batch, max_objects=MAX_OBJECTS, max_persons=MAX_PERSONS, *, user_layout=False):
        check_box_grounding(batch["boxes"].float(), batch["masks"].float(), None, batch.get("keys"), max_objects)

    def batch_inputs(self, ldm, batch, *, training=False, generator=None, check=True, max_objects=MAX_OBJECTS,
                     max_persons=MAX_PERSONS):
        if check:
            self.check_batch(batch, max_objects)
        return {"boxes": batch["boxes"].float(), "masks": batch["masks"].float()}

    def layouts_batch(self, layouts, max_objects=MAX_OBJECTS, max_persons=MAX_PERSONS, ldm=None):
        boxes, masks, _ = layout_boxes(layouts, max_objects)
        return {"boxes": boxes, "masks": masks}

    def detector(self, config):
        return box_detector(config)

    def metrics(self, images, layouts, detector=None):
        scores = box_grounding_metrics(images, layouts, detector or make_detector("toy"))
        return {f"box_only_{k}": scores[k] for k in ("ap50", "miou", "coarse_ap50")}


@pytest.fixture
def box_only():
    modality = register_modality(BoxOnlyModality())
    yield modality
    unregister_modality(modality.name)


def fit_config(tmp_path: Path, cache: Path) -> Path:
    config = {
        "seed_everything": 0,
        "run_dir": str(tmp_path / "run"),
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "log_every_n_steps": 1,
                    "limit_val_batches": 0, "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"pretrained": str(cache / "ldm"), "modality": "box_only", "gamma_init": 1.0,
                  "learning_rate": 1e-3, "warmup_steps": 0},
        "data": {"class_path": "gligen.data.datamodule.GroundingDataModule",
                 "init_args": {"train_shards": {"grounding": str(cache / "shards/train-grounding")},
                               "val_shards": str(cache / "shards/val-grounding"), "resolution": 32,
                               "batch_size": 4, "num_workers": 0, "batches_per_epoch": 2}},
    }
    path = tmp_path / "box_only.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_a_fifth_modality_registered_here_trains_samples_and_scores(box_only, tmp_path):
    assert "box_only" in modality_names() and get_modality("box_only") is box_only
    cache = build_tiny_toy_world(tmp_path)

    cli = gligen_main(["fit", "--config", str(fit_config(tmp_path, cache))])  # python -m gligen fit
    assert cli.trainer.global_step == 2 and isinstance(cli.model.ldm.unet.position_net, BoxOnlyTokenizer)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    assert saved["gligen"]["modality"] == "box_only" and saved["hyper_parameters"]["modality"] == "box_only"
    assert any(k.startswith("ldm.unet.position_net.linears") for k in saved["state_dict"])

    layout = tmp_path / "layout.json"  # python -m gligen.evaluation.sample: boxes only, no phrases needed
    layout.write_text(json.dumps({"prompt": "a red square", "objects": [{"box": [0.1, 0.1, 0.6, 0.6]}]}))
    out = tmp_path / "sample.png"
    sample_cli.main(["--ckpt", str(ckpt), "--layout", str(layout), "--steps", "2", "--out", str(out)])
    assert out.stat().st_size > 0 and (tmp_path / "sample_boxes.png").exists()

    sweep = sweep_checkpoint({  # what experiments/ablate_beta.py and every grid cell run
        "ckpt": str(ckpt), "pretrained": str(cache / "ldm"), "val_shards": str(cache / "shards/val-grounding"),
        "resolution": 32, "num_images": 2, "taus": [0.0, 1.0], "seeds": [0], "sampler": "ddim", "steps": 2,
        "guidance": 2.0, "batch_size": 2, "detector": "toy", "out": str(tmp_path / "sweep")})
    rows = list(csv.DictReader((sweep / "metrics.csv").open()))
    assert [float(r["tau"]) for r in rows] == [0.0, 1.0]
    training = saved["gligen"]["training"]  # how it was trained, in the checkpoint and in every row
    assert training["commits"] == [git_commit()] and training["train_shards_fingerprint"]
    assert training["config_hash"] == config_hash(yaml.safe_load((tmp_path / "run" / "config.yaml").read_text()))
    for row in rows:
        assert row["modality"] == "box_only" and row["ckpt_step"] == "2"
        assert row["ckpt_train_config_hash"] == training["config_hash"] and row["ckpt_train_commits"] == git_commit()
        assert row["ckpt_train_shards"] == training["train_shards_fingerprint"] and row["ckpt_base_fingerprint"]
        assert all(0 <= float(row[m]) <= 1 for m in BoxOnlyModality.metric_names)
        assert "ap50" not in row  # its own metrics, not box's
    summary = (sweep / "summary.md").read_text()
    assert "Grounding metric (box_only): box_only_coarse_ap50" in summary and "| box_only_miou |" in summary
