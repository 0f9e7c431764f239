"""Data side of the image, text_image and keypoint modalities: entity images carried as pixels and encoded on the fly,
toy person shards, and one short `fit` of each toy modality config."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from PIL import Image

from gligen.constants import NUM_KEYPOINTS
from gligen.data.collate import collate_batch
from gligen.data.datamodule import GroundingDataModule
from gligen.data.decode import SkipCounter
from gligen.data.schema import Annotation, DecodedSample, ObjectAnnotation
from gligen.data.shards import iter_samples, resolve_shards
from gligen.data.transforms import TransformConfig, entity_to_tensor, transform_sample
from gligen.ldm import FrozenLDM
from gligen.modalities.entity import entity_features
from gligen.module import GLIGENModule
from gligen.toy.build import ToyBuildConfig, build, ldm_dir, person_shard_dir, shard_dir
from gligen.toy.evaluate import evaluate_keypoints
from gligen.toy.world import PERSON_CAPTIONS
from gligen.training.rundir import load_config
from tests.helpers import ROOT, TINY

SPLITS = {"train": {"grounding": 16, "detection": 8, "detection_caption": 8}, "val": {"grounding": 8}}
PERSON_SPLITS = {"train": 16, "val": 8}

# ----------------------------------------------------------------------------------------- transforms, collate

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]


def entity_sample(arrays=None) -> DecodedSample:
    """A 64 x 48 scene with 5 objects; object i's entity image is solid COLOURS[i] (except object 3: none).
    Object 4 lies outside a 48 px centre crop; areas make the kept order 2, 0, 1, 3."""
    boxes = [(0.30, 0.1, 0.55, 0.5), (0.3, 0.5, 0.5, 0.7), (0.25, 0.1, 0.75, 0.9), (0.4, 0.75, 0.5, 0.9),
             (0.0, 0.1, 0.1, 0.5)]
    objects = tuple(ObjectAnnotation(box=b, phrase=f"object {i}", entity_image=None if i == 3 else f"entity{i}.png")
                    for i, b in enumerate(boxes))
    entities = {f"entity{i}.png": Image.new("RGB", (24 + 8 * i, 24), COLOURS[i]) for i in range(5) if i != 3}
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    return DecodedSample(key="s", url="mem", caption="c", image=image, arrays=arrays or {}, entity_images=entities,
                         annotation=Annotation(kind="grounding", source_id="s", width=64, height=48, objects=objects))


def row_colour(pixels: torch.Tensor) -> tuple[int, int, int]:
    return tuple(int(v) for v in ((pixels.mean((-1, -2)) + 1) * 127.5).round())


def test_entity_rows_follow_the_boxes_through_crop_drop_and_reorder():
    cfg = TransformConfig(resolution=32, entity_images=True, entity_resolution=16)
    out = transform_sample(entity_sample(), cfg)
    assert out["phrases"][:4] == ["object 2", "object 0", "object 1", "object 3"] and out["phrases"][4] == ""
    assert out["entity_pixel_values"].shape == (30, 3, 16, 16)
    assert out["entity_masks"].tolist() == [1, 1, 1, 0] + [0] * 26  # object 3 has no entity image; 4 was dropped
    for row, obj in enumerate((2, 0, 1)):
        assert row_colour(out["entity_pixel_values"][row]) == COLOURS[obj]
    assert out["entity_pixel_values"][3:].abs().sum() == 0
    assert out["entity_pixel_values"].min() >= -1 and out["entity_pixel_values"].max() <= 1


def test_entity_images_are_not_flipped_with_the_scene():
    sample = entity_sample()
    half = np.zeros((24, 24, 3), dtype=np.uint8)
    half[:, :12] = 255  # white left half: a mirrored copy would be white on the right
    sample.entity_images["entity2.png"] = Image.fromarray(half)
    cfg = TransformConfig(resolution=32, entity_images=True)
    plain = transform_sample(sample, cfg)
    flipped = [transform_sample(sample, cfg, np.random.default_rng(seed)) for seed in range(8)]
    flipped = [f for f in flipped if not torch.equal(f["pixel_values"], plain["pixel_values"])]
    assert flipped, "no seed flipped the scene"
    for out in flipped:
        assert torch.equal(out["pixel_values"], plain["pixel_values"].flip(-1))
        assert out["boxes"][1, 0] == pytest.approx(1 - plain["boxes"][1, 2].item())  # the scene's boxes mirror
        assert torch.equal(out["entity_pixel_values"], plain["entity_pixel_values"])  # the entity images do not
    assert torch.equal(plain["entity_pixel_values"][0], entity_to_tensor(sample.entity_images["entity2.png"], 32))
    assert plain["entity_pixel_values"][0, :, :, :16].mean() > 0.9 > plain["entity_pixel_values"][0, :, :, 16:].mean()


def test_entity_images_are_opt_in_and_precomputed_embeds_win():
    assert "entity_pixel_values" not in transform_sample(entity_sample(), TransformConfig(resolution=32))
    embeds = np.arange(5 * 8, dtype=np.float32).reshape(5, 8)
    out = transform_sample(entity_sample({"entity_embeds.npy": embeds}), TransformConfig(32, entity_images=True))
    assert "entity_pixel_values" not in out and "entity_masks" not in out
    assert torch.equal(out["entity_embeds"][:4], torch.as_tensor(embeds[[2, 0, 1, 3]]))


def test_collate_pads_missing_entity_images_and_refuses_a_mix_with_precomputed_embeds():
    cfg = TransformConfig(resolution=32, entity_images=True)
    with_images = transform_sample(entity_sample(), cfg)
    without = transform_sample(entity_sample(), TransformConfig(resolution=32))
    batch = collate_batch([with_images, without])
    assert batch["entity_pixel_values"].shape == (2, 30, 3, 32, 32)
    assert batch["entity_masks"][0].sum() == 3 and batch["entity_masks"][1].sum() == 0
    assert batch["entity_pixel_values"][1].abs().sum() == 0
    precomputed = transform_sample(entity_sample({"entity_embeds.npy": np.ones((5, 8), np.float32)}), cfg)
    with pytest.raises(ValueError, match="entity_embeds and entity images"):
        collate_batch([with_images, precomputed])


# ------------------------------------------------------------------------------------------------- toy cache


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory):
    config = ToyBuildConfig(splits=SPLITS, person_splits=PERSON_SPLITS, styled_splits={}, shard_size=16,
                            pretrain=TINY)
    out = tmp_path_factory.mktemp("toy_modalities")
    build(out, config, log=lambda *a: None)
    return out


@pytest.fixture(scope="module")
def toy_ldm(toy_cache):
    return FrozenLDM(str(ldm_dir(toy_cache)))


def toy_batch(toy_cache, n=4) -> dict:
    data = GroundingDataModule(val_shards=str(shard_dir(toy_cache, "val", "grounding")), resolution=32,
                               val_batch_size=n, num_workers=0, entity_images=True)
    return next(iter(data.val_dataloader()))


def test_on_the_fly_entity_embeds_equal_encode_entity_images(toy_cache, toy_ldm, monkeypatch):
    module = GLIGENModule(str(ldm_dir(toy_cache)), modality="image").eval()
    batch = toy_batch(toy_cache)
    assert "entity_embeds" not in batch and batch["entity_masks"].sum() > 0
    rows = batch["entity_masks"].bool() & batch["masks"].bool()
    encoded = []
    original = module.ldm.encode_entity_images
    monkeypatch.setattr(module.ldm, "encode_entity_images", lambda px: encoded.append(len(px)) or original(px))
    features = entity_features(module.ldm, batch, batch["masks"])
    assert encoded == [int(rows.sum())]  # one CLIP call, masked rows only
    expected = toy_ldm.encode_entity_images(batch["entity_pixel_values"][rows])
    assert torch.allclose(features[rows], expected, atol=1e-5)
    assert features[~rows].abs().sum() == 0
    # the same images, as the PIL entity members the precompute path encodes (32 px = the toy CLIP's input size)
    sample = GroundingDataModule(val_shards=str(shard_dir(toy_cache, "val", "grounding")), resolution=32,
                                 num_workers=0, entity_images=True)
    sample.setup("validate")
    decoded = sample.val_dataset.decoded(0)
    kept = [o.entity_image for o in decoded.annotation.objects]
    by_area = sorted(range(len(kept)), key=lambda i: -(np.prod(np.subtract(decoded.annotation.objects[i].box[2:],
                                                                           decoded.annotation.objects[i].box[:2]))))
    from_pil = toy_ldm.encode_entity_images([decoded.entity_images[kept[i]] for i in by_area])
    assert torch.allclose(features[0, : len(kept)], from_pil, atol=1e-4)
    # and the grounding tokens depend on them
    grounding = module.batch_grounding(batch)
    assert torch.equal(grounding["image_embeddings"], features) and grounding["image_masks"].sum() == rows.sum()
    with torch.no_grad():
        tokens = module.ldm.unet.position_net(**grounding)
        other = module.ldm.unet.position_net(**{**grounding, "image_embeddings": features.roll(1, 0)})
    assert not torch.allclose(tokens, other)


def test_precomputed_entity_embeds_win(toy_cache, monkeypatch):
    module = GLIGENModule(str(ldm_dir(toy_cache)), modality="text_image").eval()
    batch = toy_batch(toy_cache, n=2)
    batch["entity_embeds"] = torch.randn(2, 30, module.ldm.unet.position_net.in_dim)

    def refuse(*args, **kwargs):
        raise AssertionError("CLIP must not run when entity_embeds are precomputed")

    monkeypatch.setattr(module.ldm, "encode_entity_images", refuse)
    assert torch.equal(entity_features(module.ldm, batch, batch["masks"]), batch["entity_embeds"])
    del batch["entity_embeds"], batch["entity_pixel_values"]
    with pytest.raises(ValueError, match="entity_pixel_values"):
        entity_features(module.ldm, batch, batch["masks"])


def test_person_shards_carry_17_keypoints_per_person_that_read_back_exactly(toy_cache):
    images, layouts = [], []
    for split, n in PERSON_SPLITS.items():
        index = json.loads((person_shard_dir(toy_cache, split) / "index.json").read_text())
        assert index["total"] == n and index["kinds"] == {"grounding": n}
        for sample in iter_samples(resolve_shards(str(person_shard_dir(toy_cache, split))), SkipCounter(strict=True)):
            ann = sample.annotation
            assert sample.image.size == (32, 32) and len(ann.persons) == 1 and not ann.objects
            assert sample.caption in PERSON_CAPTIONS
            assert all(p.keypoints.shape == (NUM_KEYPOINTS, 3) and (p.keypoints[:, 2] == 2).all()
                       for p in ann.persons)
            images.append(np.asarray(sample.image))
            layouts.append(ann.to_json())
    scores = evaluate_keypoints(images, layouts)
    assert scores["pck"] == 1.0 and scores["oks_ap"] == 1.0


def test_person_shards_join_an_existing_cache_without_touching_the_ldm(toy_cache):
    weights = ldm_dir(toy_cache) / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    messages = []
    build(toy_cache, ToyBuildConfig(splits=SPLITS, person_splits={**PERSON_SPLITS, "test": 4}, styled_splits={},
                                    shard_size=16, pretrain=TINY), log=messages.append)
    assert len(messages) == 1 and "test person scenes" in messages[0]
    assert weights.stat().st_mtime_ns == before
    assert json.loads((person_shard_dir(toy_cache, "test") / "index.json").read_text())["total"] == 4


def test_default_person_splits():
    assert ToyBuildConfig().person_splits == {"train": 4000, "val": 200}


# ------------------------------------------------------------------------------------------------ fit, 2 steps


class GradProbe(Callback):
    """Records, per training step, the batch's grounding inputs and which grounding parameters got gradient."""

    def __init__(self):
        self.batches, self.grads = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.batches.append({k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()
                             if k.startswith(("entity", "keypoint", "masks"))})

    def on_after_backward(self, trainer, module):
        self.grads.append({n: float(p.grad.abs().sum()) if p.grad is not None else 0.0
                           for n, p in module.named_parameters()
                           if p.requires_grad and ("position_net" in n or n.endswith("alpha_attn"))})


def tiny_fit_config(tmp_path: Path, cache: Path, modality: str) -> Path:
    config = load_config([ROOT / "experiments/configs/toy_base.yaml",
                          ROOT / f"experiments/configs/toy_{modality}.yaml"])
    assert config["model"]["modality"] == modality and config["run_dir"] == f"runs/toy_{modality}"
    config["run_dir"] = str(tmp_path / f"runs/toy_{modality}")
    config["trainer"].update(max_steps=2, limit_val_batches=1, val_check_interval=2, log_every_n_steps=1)
    config["trainer"]["callbacks"] = [{"class_path": "tests.data.test_modality_batches.GradProbe"}]
    config["model"].update(pretrained=str(cache / "ldm"), grounding_dropout=0.0, caption_dropout=0.0)
    data = config["data"]["init_args"]
    for name, path in data["train_shards"].items():
        data["train_shards"][name] = str(cache / Path(path).relative_to("cache/toy"))
    data["val_shards"] = str(cache / Path(data["val_shards"]).relative_to("cache/toy"))
    data.update(batch_size=4, num_workers=0, batches_per_epoch=2)
    path = tmp_path / f"toy_{modality}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("modality", ["image", "text_image", "keypoint"])
def test_toy_modality_config_trains(toy_cache, tmp_path, modality):
    from gligen.training.cli import main

    cli = main(["fit", "--config", str(tiny_fit_config(tmp_path, toy_cache, modality))])
    assert cli.trainer.global_step == 2
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    assert (tmp_path / f"runs/toy_{modality}/checkpoints/last.ckpt").exists()
    probe = next(c for c in cli.trainer.callbacks if isinstance(c, GradProbe))
    assert len(probe.batches) == len(probe.grads) == 2
    for batch, grads in zip(probe.batches, probe.grads):
        if modality == "keypoint":
            assert batch["keypoint_masks"].sum() >= 17 * 4  # every scene has a person with all 17 joints visible
        else:
            assert "entity_embeds" not in batch and batch["entity_pixel_values"].shape[:2] == (4, 30)
            assert (batch["entity_masks"] * batch["masks"]).sum() > 0  # encoded on the fly
        # the grounding reaches the loss: the tokenizer MLP and the gates got gradient
        mlp = {"keypoint": "linears.0.weight", "image": "linears_image.0.weight",
               "text_image": "linears_image.0.weight"}[modality]
        assert next(v for n, v in grads.items() if n.endswith(f"position_net.{mlp}")) > 0
        assert sum(v for n, v in grads.items() if n.endswith("alpha_attn")) > 0
