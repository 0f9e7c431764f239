"""Evaluation for every grounding modality: layouts -> position-net inputs, keypoint / image-entity metrics, the sample
CLI with keypoint and entity-image layout files, and experiments/ablate_modality.py end to end at toy size."""

import csv
import json
import shutil

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.plugins.precision import Precision
from PIL import Image

from gligen.evaluation.results import read_rows
from gligen.evaluation.visualize import layouts_grid
from gligen.experiments import ablate_modality, modality_models, verify
from gligen.ldm import FrozenLDM
from gligen.metrics.grounding import entity_grounding_metrics, entity_label, keypoint_metrics
from gligen.modalities import get_modality, modality_of
from gligen.modalities.keypoint import layout_keypoints
from gligen.module import GLIGENModule
from gligen.toy.evaluate import toy_layouts
from gligen.toy.pipeline import TinyPipelineConfig, build_tiny_pipeline
from tests.helpers import RandomModalityDataModule, add_clip, run_experiment, tiny_toy_config, tiny_train_config


def person(shift=0.0, missing=()):
    kps = [[0.2 + 0.03 * k + shift, 0.1 + 0.04 * k, 2] for k in range(17)]
    for k in missing:
        kps[k] = [0.0, 0.0, 0]
    return {"keypoints": kps}


@pytest.fixture(scope="module")
def clip_pretrained(tmp_path_factory) -> str:
    root = build_tiny_pipeline(tmp_path_factory.mktemp("tiny_ldm_clip_eval"), TinyPipelineConfig(), seed=0)
    return add_clip(root, 16, 24)


def test_keypoint_layouts_become_points_and_masks(tiny_pretrained):
    layouts = [{"caption": "two people", "objects": [], "persons": [person(missing=(3, 4)), person(0.3)]},
               {"caption": "nobody", "objects": []}]
    points, masks = layout_keypoints(layouts, max_persons=8)
    assert points.shape == (2, 8, 17, 2) and masks.shape == (2, 8, 17)
    # persons with most present joints first (as the data pipeline pads them): the full one, then the one missing 2
    assert masks[0, 0].sum() == 17 and masks[0, 1].sum() == 15 and masks[0, 1, 3] == 0 and masks[0, 2:].sum() == 0
    assert torch.allclose(points[0, 0, 0], torch.tensor([0.5, 0.1])) and points[0, 1, 3].abs().sum() == 0
    assert masks[1].sum() == 0 and points[1].abs().sum() == 0  # null rows
    module = GLIGENModule(tiny_pretrained, modality="keypoint", max_persons=8)
    assert modality_of(module.ldm) is get_modality("keypoint")  # recorded by the module, not guessed
    grounding = modality_of(module.ldm).layout_inputs(module.ldm, layouts)
    assert set(grounding) == {"points", "masks"} and torch.equal(grounding["masks"], masks)
    tokens = module.ldm.unet.position_net(**grounding)
    assert tokens.shape == (2, 8 * 17, module.ldm.unet.config.cross_attention_dim)


def test_entity_layouts_become_text_image_inputs(clip_pretrained, tmp_path):
    ldm = FrozenLDM(clip_pretrained)
    red = Image.new("RGB", (20, 30), (255, 0, 0))
    red.save(tmp_path / "red.png")
    embed = torch.randn(32)
    layouts = [{"caption": "a", "objects": [
        {"box": [0.1, 0.1, 0.4, 0.4], "phrase": "a red square", "entity_image": str(tmp_path / "red.png")},
        {"box": [0.5, 0.5, 0.9, 0.9], "phrase": "a blue circle"},  # text only
        {"box": [0.2, 0.5, 0.4, 0.9], "entity_image": np.full((16, 16, 3), 40, np.uint8)},  # image only
        {"box": [0.6, 0.1, 0.9, 0.3], "phrase": "x", "entity_embed": embed.tolist()}]},  # precomputed
        {"caption": "b", "objects": []}]
    g = get_modality("text_image").layout_inputs(ldm, layouts, max_objects=6)
    assert set(g) == {"boxes", "masks", "phrases_masks", "image_masks", "phrases_embeddings", "image_embeddings"}
    assert g["boxes"].shape == (2, 6, 4) and g["image_embeddings"].shape == (2, 6, 32)
    assert g["masks"][0].tolist() == [1, 1, 1, 1, 0, 0] and g["masks"][1].sum() == 0
    assert g["phrases_masks"][0].tolist() == [1, 1, 0, 1, 0, 0]
    assert g["image_masks"][0].tolist() == [1, 0, 1, 1, 0, 0]
    direct = ldm.encode_entity_images([red])[0]
    torch.testing.assert_close(g["image_embeddings"][0, 0], direct)
    torch.testing.assert_close(g["image_embeddings"][0, 3], embed)
    assert g["image_embeddings"][0, 1].abs().sum() == 0 and g["image_embeddings"][1].abs().sum() == 0
    image_only = get_modality("image").layout_inputs(ldm, layouts, max_objects=6)
    assert image_only["phrases_masks"].sum() == 0 and image_only["phrases_embeddings"].abs().sum() == 0
    torch.testing.assert_close(image_only["image_embeddings"], g["image_embeddings"])
    with pytest.raises(ValueError, match="entity_embed has 3 values"):
        get_modality("image").layout_inputs(ldm, [{"objects": [{"box": [0, 0, 1, 1], "entity_embed": [1, 2, 3]}]}])


def test_keypoint_metrics_are_exact_on_real_toy_scenes_and_drop_when_joints_move():
    layouts, images = toy_layouts("persons", 6, 32)
    assert all(layout["persons"] for layout in layouts)
    exact = get_modality("keypoint").metrics(images, layouts)
    assert exact["pck"] == 1.0 and exact["oks_ap"] == pytest.approx(1.0)
    shifted = [{**layout, "persons": [{"keypoints": [[x + 0.12, y, v] for x, y, v in p["keypoints"]]}
                                      for p in layout["persons"]]} for layout in layouts]
    moved = get_modality("keypoint").metrics(images, shifted)
    assert moved["pck"] < 0.5 and moved["oks_ap"] < exact["oks_ap"]

    # a user pose detector: plain [P, 17, 3] arrays per image (scores default to the fraction of joints found)
    def oracle(batch):
        return [np.array([p["keypoints"] for p in layout["persons"]], dtype=float) for layout in layouts]
    assert keypoint_metrics(images, layouts, oracle)["pck"] == 1.0


def test_person_placement_ignores_joint_identity_but_not_position():
    """person_ap50: a figure where the person was asked for counts even with every joint in the wrong colour."""
    layouts, images = toy_layouts("persons", 20, 32)
    exact = get_modality("keypoint").metrics(images, layouts)
    assert exact["person_ap50"] == pytest.approx(1.0) and exact["person_miou"] > 0.6
    recoloured = []
    for image in images:  # every figure pixel turned uniform green: no joint is readable any more
        figure = image.max(-1) > 60
        out = np.zeros_like(image)
        out[figure] = (0, 200, 40)
        recoloured.append(out)
    scores = get_modality("keypoint").metrics(recoloured, layouts)
    assert scores["pck"] < 0.2 and scores["person_ap50"] == pytest.approx(exact["person_ap50"])
    moved = [np.zeros_like(image) for image in images]  # every figure half the image to the right (cut off there)
    for out, image in zip(moved, images):
        out[:, 16:] = image[:, :16]
    moved = get_modality("keypoint").metrics(moved, layouts)
    assert moved["person_ap50"] < 0.2 and moved["person_miou"] < exact["person_miou"] / 2
    blank = get_modality("keypoint").metrics([np.zeros_like(image) for image in images], layouts)
    assert blank["person_ap50"] == 0.0 and blank["person_miou"] == 0.0

    # a user pose detector: person boxes are the boxes of its found joints
    def oracle(batch):
        return [np.array([p["keypoints"] for p in layout["persons"]], dtype=float) for layout in layouts]
    assert keypoint_metrics(images, layouts, oracle)["person_miou"] == pytest.approx(1.0)


def test_entity_ap_looks_for_the_reference_images_class():
    layouts, images = toy_layouts("objects", 6, 32)
    assert all(o["entity_image"] is not None for layout in layouts for o in layout["objects"])
    assert entity_label({"phrase": "thing", "category": "red square"}) == "red square"
    assert entity_label({"phrase": "thing", "category": "red square", "entity_category": "blue cross"}) == "blue cross"
    exact = get_modality("image").metrics(images, layouts)
    assert exact["entity_ap50"] == pytest.approx(1.0) and exact["entity_miou"] > 0.9
    # phrases do not matter, the reference class does: rename phrases -> same score; another reference class -> 0
    renamed = [{**lay, "objects": [{**o, "phrase": "something"} for o in lay["objects"]]} for lay in layouts]
    assert get_modality("text_image").metrics(images, renamed)["entity_ap50"] == pytest.approx(1.0)

    def detector(batch):
        return [[{"box": o["box"], "label": o["category"], "score": 1.0} for o in lay["objects"]] for lay in layouts]
    other = [{**lay, "objects": [{**o, "entity_category": "nothing"} for o in lay["objects"]]} for lay in layouts]
    assert entity_grounding_metrics(images, layouts, detector)["entity_ap50"] == pytest.approx(1.0)
    assert entity_grounding_metrics(images, other, detector)["entity_ap50"] == 0.0
    assert "entity_coarse_ap50" not in entity_grounding_metrics(images, layouts, detector)  # no coarse_label

    # the toy detector also scores placement by colour: a reference of the same colour but another shape misses
    # as a class and hits as a colour
    def reshape(category):
        colour, shape = category.split()
        return f"{colour} {'cross' if shape != 'cross' else 'circle'}"
    reshaped = [{**lay, "objects": [{**o, "entity_category": reshape(o["category"])} for o in lay["objects"]]}
                for lay in layouts]
    scores = get_modality("image").metrics(images, reshaped)
    assert scores["entity_ap50"] == 0.0 and scores["entity_coarse_ap50"] == pytest.approx(1.0)
    assert exact["entity_coarse_ap50"] == pytest.approx(1.0)


def test_layouts_grid_draws_keypoints_and_skeleton():
    layouts, images = toy_layouts("persons", 2, 32)
    black = [np.zeros_like(im) for im in images]
    with_persons = layouts_grid(black, layouts)
    without = layouts_grid(black, [{**lay, "persons": []} for lay in layouts])
    assert with_persons.shape == without.shape and with_persons.dtype == torch.uint8
    assert with_persons.sum() > 0 and without.sum() == 0


def train_one_step(pretrained, modality, tmp_path, **kwargs):
    L.seed_everything(0)
    module = GLIGENModule(pretrained, modality=modality, gamma_init=0.5, warmup_steps=0, **kwargs)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, RandomModalityDataModule())
    path = tmp_path / f"{modality}.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_sample_cli_with_keypoint_and_entity_image_layouts(clip_pretrained, tmp_path):
    from gligen.evaluation.sample import main

    ckpt = train_one_step(clip_pretrained, "keypoint", tmp_path)
    layout = tmp_path / "pose.json"
    layout.write_text(json.dumps({"prompt": "a person", "persons": [person(missing=(1, 2))]}))
    main(["--ckpt", str(ckpt), "--layout", str(layout), "--steps", "2", "--tau", "1", "--out", str(tmp_path / "k.png")])
    assert Image.open(tmp_path / "k.png").size == (16, 16) and Image.open(tmp_path / "k_boxes.png").size == (256, 256)
    bad = [[0.5, 1.5, 2]] + person()["keypoints"][1:]
    layout.write_text(json.dumps({"persons": [{"keypoints": bad}]}))
    with pytest.raises(ValueError, match="pose.json"):
        main(["--ckpt", str(ckpt), "--layout", str(layout), "--steps", "2", "--out", str(tmp_path / "bad.png")])

    ckpt = train_one_step(clip_pretrained, "image", tmp_path)
    Image.new("RGB", (24, 24), (0, 0, 255)).save(tmp_path / "blue.png")
    layout = tmp_path / "entity.json"
    layout.write_text(json.dumps({"prompt": "a blue thing", "objects": [{"box": [0.1, 0.2, 0.6, 0.7],
                                                                         "entity_image": "blue.png"}]}))
    args = ["--ckpt", str(ckpt), "--layout", str(layout), "--steps", "2", "--tau", "1", "--seed", "3"]
    main(args + ["--out", str(tmp_path / "e.png")])
    main(args + ["--out", str(tmp_path / "f.png")])
    assert Image.open(tmp_path / "e.png").tobytes() == Image.open(tmp_path / "f.png").tobytes()
    assert (tmp_path / "e_boxes.png").exists()
    layout.write_text(json.dumps({"objects": [{"box": [0.1, 0.2, 0.6, 0.7], "phrase": "no image"}]}))
    with pytest.raises(ValueError, match="no entity_image"):
        main(args + ["--out", str(tmp_path / "g.png")])
    layout.write_text(json.dumps({"objects": [{"box": [0.1, 0.2, 0.6, 0.7], "entity_image": "missing.png"}]}))
    with pytest.raises(ValueError, match="does not exist"):
        main(args + ["--out", str(tmp_path / "g.png")])


# ------------------------------------------------------------------------------------------- ablate_modality


@pytest.mark.slow
def test_ablate_modality_runs_end_to_end_on_a_tiny_toy_world(tmp_path):
    cache = tmp_path / "cache"
    modalities = ["box", "image"]
    train_configs = {m: str(tiny_train_config(tmp_path, cache, m, steps=1, validate=False)) for m in modalities}
    overrides = {"toy_cache": str(cache), "toy_config": str(tiny_toy_config(tmp_path)),
                 "out": str(tmp_path / "results"),
                 "modalities": modalities, "seeds": [0, 1], "num_images": 4, "steps": 2, "batch_size": 4,
                 "grid_size": 4, "train_configs": train_configs, "train_seeds": [0, 1]}
    out, rows = run_experiment("ablate_modality.py", overrides, tmp_path)
    assert [(r["modality"], int(r["train_seed"]), float(r["tau"]), int(r["seed"])) for r in rows] == [
        (m, t, tau, s) for m in modalities for t in (0, 1) for tau in (0.0, 1.0) for s in (0, 1)]
    for modality in modalities:  # one model per training seed
        models = {(r["train_seed"], r["ckpt"], r["ckpt_weights_hash"]) for r in rows if r["modality"] == modality}
        assert len(models) == 2 and len({m[2] for m in models}) == 2 and all(m[1] for m in models)
    for row in rows:
        assert row["git_commit"] and row["config_hash"] and 0 <= float(row["value"]) <= 1
        assert "ablate_modality.py" in row["command"] and row["processor_class"] and float(row["stage_s"]) > 0
        assert row["metric"] == {"box": "ap50", "image": "entity_ap50"}[row["modality"]]
        assert row["placement_metric"] == {"box": "coarse_ap50", "image": "entity_coarse_ap50"}[row["modality"]]
        assert float(row["placement"]) == float(row[row["placement_metric"]])
    summary = (out / "summary.md").read_text()
    assert "## box" in summary and "## image" in summary and "ablate_modality.py" in summary
    assert "2 trained models per modality" in summary and "Differences from tau = 0.0" in summary
    report = verify.verify_folder(out)  # the summary recomputes from metrics.csv + vae_ceiling.csv + config.json
    assert not report.failures and any("tables recompute" in line for line in report.passed), report.text()
    with open(out / "vae_ceiling.csv") as f:
        ceilings = list(csv.DictReader(f))
    assert [(c["modality"], c["metric"]) for c in ceilings] == [("box", "ap50"), ("image", "entity_ap50")]
    assert all(0 <= float(c["value"]) <= 1 and c["git_commit"] for c in ceilings) and "VAE ceiling" in summary

    # finishable across sessions: each model's scores are kept in out/models; with every checkpoint gone (they are
    # not committed) a rerun, even of fewer modalities, neither trains nor scores again and writes the same rows
    shutil.rmtree(tmp_path / "runs")
    out, again = run_experiment("ablate_modality.py", {**overrides, "modalities": ["image", "box"]}, tmp_path,
                                in_process=True)  # the CLI ran above
    assert not (tmp_path / "runs").exists()
    key = ("modality", "train_seed", "tau", "seed", "value", "placement", "config_hash", "ckpt_weights_hash")
    assert sorted(tuple(r[k] for k in key) for r in again) == sorted(tuple(r[k] for k in key) for r in rows)
    assert not verify.verify_folder(out).failures
    # models kept from several sessions: the summary names each model's training and scoring commits
    mixed = [{**r, "git_commit": "feedface0000"} if r["modality"] == "image" else r
             for r in read_rows(out / "metrics.csv")]
    text = ablate_modality.summary_text(out, mixed, json.loads((out / "config.json").read_text()), ceilings)
    header = next(line for line in text.splitlines() if line.startswith("scored at git"))
    assert "`feedface0000`" in header and f"`{rows[0]['git_commit']}`" in header
    assert "training seeds [0, 1] " in header  # as numbers, though rows read back from CSV hold strings
    sections = {part.split("\n", 1)[0]: part for part in text.split("\n## ")[1:]}
    box, image = ([line for line in sections[m].splitlines() if line.startswith(("| 0 | `", "| 1 | `"))]
                  for m in ("box", "image"))
    assert len(box) == len(image) == 2 and all(line.endswith("| `feedface0000` |") for line in image)
    assert all(line.endswith(f"| `{rows[0]['git_commit']}` |") for line in box)
    config = ablate_modality.parse_args(["--config", str(tmp_path / "ablate.yaml")])
    folder = modality_models.model_dir(config, "box", 1)
    assert modality_models.model_scored(folder, modality_models.model_settings("box", config, 1))
    assert not modality_models.model_scored(folder, modality_models.model_settings("box", {**config, "steps": 3}, 1))
    assert not modality_models.model_scored(folder, modality_models.model_settings("box", config, 0))
    assert (out / "modalities.png").stat().st_size > 0
    assert all((out / f"samples_{m}_tau{t}.png").exists() for m in modalities for t in (0, 1))
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))


@pytest.mark.parametrize("modality", ["keypoint", "image"])
def test_sample_grid_callback_samples_and_draws_every_modality(clip_pretrained, modality, monkeypatch):
    """SampleGrid turns a validation batch into the module's own grounding inputs and logs a grid to TensorBoard."""
    from gligen.training import callbacks

    torch.manual_seed(0)
    module = GLIGENModule(clip_pretrained, modality=modality, max_persons=8)
    batch = {"captions": ["a person", "a red square"], "keys": ["a", "b"], "boxes": torch.zeros(2, 30, 4),
             "masks": torch.zeros(2, 30), "phrases": [[""] * 30, [""] * 30]}
    if modality == "keypoint":
        points = torch.tensor([p[:2] for p in person()["keypoints"]])
        batch["keypoints"] = torch.zeros(2, 8, 17, 2)
        batch["keypoint_masks"] = torch.zeros(2, 8, 17)
        batch["keypoints"][0, 0], batch["keypoint_masks"][0, 0] = points, 1
    else:
        batch["boxes"][:, 0] = torch.tensor([0.1, 0.2, 0.6, 0.7])
        batch["masks"][:, 0] = 1
        batch["phrases"][1][0] = "a red square"
        batch["entity_pixel_values"] = torch.rand(2, 30, 3, 16, 16) * 2 - 1
        batch["entity_masks"] = torch.zeros(2, 30)
        batch["entity_masks"][:, 0] = 1

    seen, logged, drawn = {}, [], []
    real_grid = callbacks.layouts_grid
    monkeypatch.setattr(callbacks, "layouts_grid", lambda images, layouts, **k: drawn.extend(layouts) or
                        real_grid(images, layouts, **k))
    real_sample = callbacks.sample
    monkeypatch.setattr(callbacks, "sample", lambda ldm, captions, grounding, *a, **k: seen.update(grounding) or
                        real_sample(ldm, captions, grounding, *a, **k))

    class Experiment:
        def add_image(self, tag, image, step):
            logged.append((tag, image, step))

    trainer = type("T", (), {})()
    trainer.datamodule = type("D", (), {"val_shards": "x", "val_dataloader": lambda self: [batch]})()
    trainer.logger = type("Lg", (), {"experiment": Experiment()})()
    trainer.global_step = 7
    trainer.precision_plugin = Precision()  # Lightning's fp32 plugin: sampling runs in the trainer's precision
    grid_callback = callbacks.SampleGrid(num_images=2, steps=2, guidance=1.0)
    grid_callback.log_grid(trainer, module)
    ((tag, image, step),) = logged
    assert tag == "samples/tau_1" and step == 7 and image.dtype == torch.uint8 and image.shape[0] == 3
    if modality == "keypoint":
        assert set(seen) == {"points", "masks"}
        assert torch.allclose(seen["points"][0, 0], points) and seen["masks"][1].sum() == 0
        assert len(drawn[0]["persons"]) == 1 and not drawn[1].get("persons")  # the skeleton is drawn
    else:
        assert seen["image_masks"][:, 0].tolist() == [1.0, 1.0] and seen["phrases_masks"].sum() == 0
        assert seen["image_embeddings"][:, 0].abs().sum() > 0
        assert [len(layout["objects"]) for layout in drawn] == [1, 1]  # the entity boxes are drawn
    assert module.training  # put back in training mode


def test_reconstruct_round_trips_pixels_in_order_across_batches(tiny_pretrained, monkeypatch):
    """With an identity autoencoder, reconstruct() returns the very images: the [0, 255] <-> [-1, 1] conversions and
    the batching keep every pixel and the order."""
    from gligen.evaluation.generate import reconstruct

    ldm = FrozenLDM(tiny_pretrained)
    monkeypatch.setattr(ldm, "encode_images", lambda pixels, generator=None: pixels)
    monkeypatch.setattr(ldm, "decode_latents", lambda latents: latents)
    images = [np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8) for i in range(7)]
    out = reconstruct(ldm, images, batch_size=3)
    assert len(out) == 7 and all(o.dtype == np.uint8 and np.array_equal(o, i) for o, i in zip(out, images))
