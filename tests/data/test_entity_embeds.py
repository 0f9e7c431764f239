"""Image entities on the data side: FrozenLDM.encode_entity_images, entity_embeds.npy from precompute, the batch's
entity_embeds, and --entity-crops in the COCO / MDETR converters."""

import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPModel

from gligen.data.__main__ import main as data_main
from gligen.data.convert.coco import ENTITY_PAD, box_pixels, convert_coco, entity_crop
from gligen.data.convert.mdetr import convert_mdetr
from gligen.data.convert.precompute import REPORT_FILE, PrecomputeConfig, precompute_shards
from gligen.data.datamodule import GroundingDataModule
from gligen.data.decode import SkipCounter
from gligen.data.examples import make_sample, png_bytes
from gligen.data.shards import iter_samples, resolve_shards, write_shards
from gligen.ldm import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD, FrozenLDM
from gligen.nn.tokenizers import IMAGE_FEATURE_NORM
from gligen.toy.pipeline import TinyPipelineConfig, build_tiny_pipeline
from tests.helpers import add_clip

RES = 16
CLIP_SIZE = 24  # vision tower image_size
PROJ = 16  # CLIP projection width != text width (32): the projection's orientation matters
TOL = 1e-5


@pytest.fixture(scope="module")
def clip_pretrained(tmp_path_factory) -> str:
    """A tiny SD directory with `clip/`: a CLIPModel whose text tower is the SD text encoder (as the toy writes)."""
    root = build_tiny_pipeline(tmp_path_factory.mktemp("tiny_ldm_clip"), TinyPipelineConfig(), seed=0)
    return add_clip(root, PROJ, CLIP_SIZE)


@pytest.fixture(scope="module")
def ldm(clip_pretrained):
    return FrozenLDM(clip_pretrained)


def _image(width, height, seed):
    return Image.open(io.BytesIO(png_bytes(width, height, seed))).convert("RGB")


# ------------------------------------------------------------------------------------------- FrozenLDM
def test_clip_is_found_lazily_and_kept_out_of_the_state_dict(ldm, clip_pretrained, tiny_pretrained):
    assert ldm.has_clip and ldm.clip_path.endswith("clip")
    assert not any(k.startswith("_clip") or "vision" in k for k in ldm.state_dict())
    assert not FrozenLDM(tiny_pretrained).has_clip  # no <pretrained>/clip and no argument
    with pytest.raises(ValueError, match="no CLIP model"):
        FrozenLDM(tiny_pretrained).encode_entity_images([_image(8, 8, 0)])


def test_encode_entity_images_matches_manual_clip_computation(ldm):
    images = [_image(30, 20, 1), _image(CLIP_SIZE, CLIP_SIZE, 2), _image(10, 40, 3)]
    got = ldm.encode_entity_images(images)
    assert got.shape == (3, ldm.text_encoder.config.hidden_size)
    torch.testing.assert_close(got.norm(dim=-1), torch.full((3,), IMAGE_FEATURE_NORM), atol=1e-4, rtol=0)

    # preprocessing: what transformers' CLIPImageProcessor does for this image_size (resize short side, bicubic,
    # centre crop, CLIP mean/std); tolerance covers its resampling backend
    processor = CLIPImageProcessor(size={"shortest_edge": CLIP_SIZE}, crop_size={"height": CLIP_SIZE,
                                   "width": CLIP_SIZE}, image_mean=list(CLIP_IMAGE_MEAN),
                                   image_std=list(CLIP_IMAGE_STD))
    reference = processor(images=images, return_tensors="pt").pixel_values
    pixels = ldm.clip_pixels(images)
    assert pixels.shape == reference.shape == (3, 3, CLIP_SIZE, CLIP_SIZE)
    torch.testing.assert_close(pixels[1], reference[1], atol=1e-5, rtol=0)  # no resize: exact
    assert (pixels - reference).abs().max() < 0.03  # about one uint8 level after resampling

    # features: the same CLIPModel's image features times its own text projection, unit norm x 28.7
    clip = CLIPModel.from_pretrained(ldm.clip_path).eval()
    with torch.no_grad():
        image_embeds = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)
        image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)  # CLIP's image_embeds
        manual = image_embeds @ clip.text_projection.weight  # [K, PROJ] @ [PROJ, D]
    manual = manual / manual.norm(dim=-1, keepdim=True) * 28.7
    torch.testing.assert_close(got, manual, atol=1e-4, rtol=0)


def test_a_clip_whose_text_tower_is_not_the_text_encoder_is_flagged(ldm, clip_pretrained, tmp_path, caplog):
    other = CLIPModel.from_pretrained(ldm.clip_path)
    with torch.no_grad():
        other.text_model.embeddings.token_embedding.weight.add_(1.0)
    other.save_pretrained(tmp_path / "other_clip")
    foreign = FrozenLDM(clip_pretrained, clip=str(tmp_path / "other_clip"))
    with caplog.at_level(logging.WARNING):
        foreign.encode_entity_images([_image(8, 8, 0)])
    assert "text tower differs" in caplog.text


def test_encode_entity_images_takes_tensors_in_minus_one_one(ldm):
    image = _image(CLIP_SIZE, CLIP_SIZE, 4)
    px = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    torch.testing.assert_close(ldm.encode_entity_images(px[None]), ldm.encode_entity_images([image]),
                               atol=1e-4, rtol=0)
    assert ldm.encode_entity_images([]).shape == (0, ldm.text_encoder.config.hidden_size)


# ------------------------------------------------------------------------------------------- precompute
def _with_entities(sample, members):
    """Give object i the entity image members[i] (None: no image); distinct members get distinct images."""
    for i, (obj, member) in enumerate(zip(sample["json"]["objects"], members)):
        obj["entity_image"] = member
        if member is not None and member not in sample:
            sample[member] = png_bytes(12 + i, 10, seed=100 + i)
    return sample


def _entity_sources():
    # wide: the crop drops object 2 (left edge) and reorders 0, 1 (largest first); object 1 has no image
    yield _with_entities(make_sample("wide", caption="a red square and a blue circle", width=24, height=16, seed=1,
                                     boxes=[(0.0, 0.1, 0.3, 0.9), (0.5, 0.2, 0.9, 0.8), (0.0, 0.0, 0.1, 0.5)],
                                     phrases=["a red square", "a blue circle", "the green triangle"]),
                         ["entity0.png", None, "entity2.png"])
    # two objects share one entity image
    yield _with_entities(make_sample("tall", caption="the green triangle", width=16, height=22, seed=2,
                                     boxes=[(0.1, 0.0, 0.9, 0.6), (0.2, 0.5, 0.6, 0.9)],
                                     phrases=["the green triangle", "a circle"]),
                         ["entity0.png", "entity0.png"])
    # latents already present: geometry fixed, only the embeddings are computed
    # (64 px: make_sample's 8x8 latents, the size the tiny VAE gives the 16 px crops)
    yield _with_entities(make_sample("lat", caption="a red circle", latents=True, width=64, height=64, seed=3,
                                     boxes=[(0.1, 0.1, 0.6, 0.6), (0.5, 0.5, 0.9, 0.9)], phrases=["red", "blue"]),
                         [None, "entity3.png"])


@pytest.fixture(scope="module")
def precomputed(tmp_path_factory, clip_pretrained, ldm):
    root = tmp_path_factory.mktemp("entity_precompute")
    write_shards(_entity_sources(), root / "src", progress=False)
    precompute_shards(clip_pretrained, str(root / "src"), str(root / "out"), PrecomputeConfig(RES, flip=True,
                      batch_size=2), progress=False, ldm=ldm)
    originals = {s.key: s for s in iter_samples(resolve_shards(str(root / "src")), SkipCounter(strict=True))}
    outputs = {s.key: s for s in iter_samples(resolve_shards(str(root / "out")), SkipCounter(strict=True))}
    return {"root": root, "originals": originals, "outputs": outputs}


def _expected_rows(ldm, original, output):
    """One row per output object: encode_entity_images of its entity image, zeros without one."""
    rows = torch.zeros(len(output.annotation.objects), ldm.text_encoder.config.hidden_size)
    for j, obj in enumerate(output.annotation.objects):
        if obj.entity_image is not None:
            rows[j] = ldm.encode_entity_images([original.entity_images[obj.entity_image]])[0]
    return rows


def test_precompute_writes_entity_embeds_rows_of_the_kept_objects(precomputed, ldm):
    wide = precomputed["outputs"]["wide"]
    assert [o.phrase for o in wide.annotation.objects] == ["a blue circle", "a red square"]  # 2 dropped, reordered
    assert [o.entity_image for o in wide.annotation.objects] == [None, "entity0.png"]
    for key, out in precomputed["outputs"].items():
        emb = out.arrays["entity_embeds.npy"]
        assert emb.dtype == np.float32 and emb.shape == (len(out.annotation.objects), 32), key
        assert "entity_embeds_flip.npy" not in out.arrays  # the reference image does not flip with the scene
        expected = _expected_rows(ldm, precomputed["originals"][key], out)
        torch.testing.assert_close(torch.from_numpy(emb), expected, atol=TOL, rtol=0)
        for obj, row in zip(out.annotation.objects, emb):
            assert (np.abs(row).sum() == 0) == (obj.entity_image is None), key
            assert obj.entity_image is None or obj.entity_image in out.entity_images  # images stay in the shard
    tall = precomputed["outputs"]["tall"].arrays["entity_embeds.npy"]
    np.testing.assert_array_equal(tall[0], tall[1])  # shared member, same row
    report = json.loads((precomputed["root"] / "out" / REPORT_FILE).read_text())
    assert report["entity"] == {"entity_embeds": 3} and report["clip"].endswith("clip")


def test_datamodule_batch_carries_entity_embeds_aligned_with_boxes(precomputed):
    dm = GroundingDataModule(train_shards={"pre": str(precomputed["root"] / "out")}, resolution=RES, batch_size=2,
                             num_workers=0, batches_per_epoch=6, random_flip=True, shuffle_buffer=3, seed=1)
    seen = set()
    for batch in dm.train_dataloader():
        assert batch["entity_embeds"].shape == (*batch["boxes"].shape[:2], 32)
        for i, key in enumerate(batch["keys"]):
            seen.add(key)
            out = precomputed["outputs"][key]
            rows = {o.phrase: r for o, r in zip(out.annotation.objects, out.arrays["entity_embeds.npy"])}
            n = int(batch["masks"][i].sum())
            assert n == len(rows)
            for j in range(n):  # row j belongs to box j (its phrase), flipped or not
                np.testing.assert_array_equal(batch["entity_embeds"][i, j].numpy(), rows[batch["phrases"][i][j]])
            assert torch.count_nonzero(batch["entity_embeds"][i, n:]) == 0
    assert seen == set(precomputed["outputs"])


def test_precompute_without_clip_keeps_entity_images_and_reports(tmp_path, ldm, clip_pretrained, caplog):
    write_shards(list(_entity_sources())[:1], tmp_path / "src", progress=False)
    path = ldm.clip_path
    ldm.set_clip(None)
    try:
        with caplog.at_level(logging.WARNING):
            precompute_shards(clip_pretrained, str(tmp_path / "src"), str(tmp_path / "out"), PrecomputeConfig(RES),
                              progress=False, ldm=ldm)
    finally:
        ldm.set_clip(path)
    (out,) = iter_samples(resolve_shards(str(tmp_path / "out")), SkipCounter(strict=True))
    assert "entity_embeds.npy" not in out.arrays and "entity0.png" in out.entity_images
    assert json.loads((tmp_path / "out" / REPORT_FILE).read_text())["entity"] == {"entity_images_without_clip": 1}
    assert "no CLIP directory" in caplog.text


def test_precompute_cli_default_clip_and_float16(tmp_path, clip_pretrained, ldm, capsys):
    src = list(_entity_sources())[1]
    write_shards([src], tmp_path / "src", progress=False)
    assert data_main(["precompute", "--pretrained", clip_pretrained, "--shards", str(tmp_path / "src"), "--out",
                      str(tmp_path / "out"), "--resolution", str(RES), "--dtype", "float16", "--device", "cpu",
                      "--no-progress"]) == 0
    (out,) = iter_samples(resolve_shards(str(tmp_path / "out")), SkipCounter(strict=True))
    (original,) = iter_samples(resolve_shards(str(tmp_path / "src")), SkipCounter(strict=True))
    assert out.arrays["entity_embeds.npy"].dtype == np.float16
    torch.testing.assert_close(torch.from_numpy(out.arrays["entity_embeds.npy"]).float(),
                               _expected_rows(ldm, original, out), atol=2e-2, rtol=1e-3)
    other = tmp_path / "elsewhere"
    assert data_main(["precompute", "--pretrained", clip_pretrained, "--clip", f"{clip_pretrained}/clip",
                      "--shards", str(tmp_path / "src"), "--out", str(other), "--resolution", str(RES), "--device",
                      "cpu", "--no-progress"]) == 0
    assert json.loads((other / REPORT_FILE).read_text())["clip"] == f"{clip_pretrained}/clip"


# ------------------------------------------------------------------------------------------- entity crops
def _write_image(path, width, height, fmt, seed):
    arr = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt)
    return np.asarray(Image.open(path).convert("RGB"))  # decoded as the converter decodes it (JPEG too)


def _read(out_dir):
    return {s.key: s for s in iter_samples(resolve_shards(str(out_dir)), SkipCounter(strict=True))}


def test_box_pixels_and_entity_crop_pad_to_a_square():
    assert box_pixels([4 / 40, 2 / 20, 14 / 40, 10 / 20], 40, 20) == (4, 2, 14, 10)
    assert box_pixels([4.5 / 40, 2 / 20, 14.5 / 40, 10.25 / 20], 40, 20) == (4, 2, 15, 11)  # covers the box
    arr = np.random.default_rng(0).integers(0, 256, size=(20, 40, 3), dtype=np.uint8)
    crop = np.asarray(entity_crop(Image.fromarray(arr), [4 / 40, 2 / 20, 14 / 40, 10 / 20], 10))  # 10 x 8 box
    assert crop.shape == (10, 10, 3)
    np.testing.assert_array_equal(crop[1:9], arr[2:10, 4:14])  # centred vertically
    assert (crop[[0, 9]] == np.array(ENTITY_PAD, np.uint8)).all()
    assert entity_crop(Image.fromarray(arr), [0.1, 0.1, 0.5, 0.5], 7).size == (7, 7)


def test_coco_entity_crops_equal_the_box_regions(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    pixels = _write_image(images / "a.png", 40, 20, "PNG", 1)
    instances = {
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 20}],
        "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [20, 0, 20, 20], "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 2, "bbox": [3, 5, 4, 4], "iscrowd": 0},
            {"id": 12, "image_id": 1, "category_id": 2, "bbox": [0, 0, 40, 20], "iscrowd": 1},  # crowd: dropped
        ],
    }
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    convert_coco(str(tmp_path / "instances.json"), str(images), str(tmp_path / "plain"), progress=False)
    (plain,) = _read(tmp_path / "plain").values()
    assert not plain.entity_images and all(o.entity_image is None for o in plain.annotation.objects)

    assert data_main(["convert", "coco", "--instances", str(tmp_path / "instances.json"), "--images", str(images),
                      "--out", str(tmp_path / "out"), "--entity-crops", "--entity-size", "20", "--no-progress"]) == 0
    (s,) = _read(tmp_path / "out").values()
    assert [o.entity_image for o in s.annotation.objects] == ["entity0.png", "entity1.png"]
    assert set(s.entity_images) == {"entity0.png", "entity1.png"}
    np.testing.assert_array_equal(np.asarray(s.entity_images["entity0.png"]), pixels[0:20, 20:40])
    small = np.asarray(s.entity_images["entity1.png"])
    assert small.shape == (20, 20, 3)  # 4 x 4 box, upsampled
    np.testing.assert_array_equal(np.asarray(Image.fromarray(pixels[5:9, 3:7]).resize((20, 20), Image.BICUBIC)),
                                  small)


def test_mdetr_entity_crops_equal_the_box_regions(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    pixels = _write_image(images / "f.jpg", 32, 24, "JPEG", 2)
    caption = "a man holds a small dog ."
    data = {
        "images": [{"id": 0, "file_name": "f.jpg", "width": 32, "height": 24, "caption": caption}],
        "categories": [{"id": 1, "name": "object"}],
        "annotations": [
            {"id": 0, "image_id": 0, "category_id": 1, "bbox": [16, 8, 12, 12], "iscrowd": 0,
             "tokens_positive": [[0, 5]]},
            {"id": 1, "image_id": 0, "category_id": 1, "bbox": [2, 0, 12, 6], "iscrowd": 0,
             "tokens_positive": [[12, 23]]},
        ],
    }
    (tmp_path / "mdetr.json").write_text(json.dumps(data))
    convert_mdetr(str(tmp_path / "mdetr.json"), str(images), str(tmp_path / "out"), entity_size=12, progress=False)
    (s,) = _read(tmp_path / "out").values()
    assert [o.phrase for o in s.annotation.objects] == ["a man", "a small dog"]
    np.testing.assert_array_equal(np.asarray(s.entity_images["entity0.png"]), pixels[8:20, 16:28])
    wide = np.asarray(s.entity_images["entity1.png"])  # 12 x 6 box: padded above and below by 3 rows
    np.testing.assert_array_equal(wide[3:9], pixels[0:6, 2:14])
    assert (wide[:3] == np.array(ENTITY_PAD, np.uint8)).all() and (wide[9:] == np.array(ENTITY_PAD, np.uint8)).all()
