"""precompute: latents and embeddings written into shards equal what FrozenLDM computes on the training crop."""

import io
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from gligen.data.convert.precompute import PrecomputeConfig, precompute_shards
from gligen.data.datamodule import GroundingDataModule
from gligen.data.decode import SkipCounter, decode_sample
from gligen.data.examples import make_sample
from gligen.data.shards import encode_sample, iter_raw_samples, iter_samples, resolve_shards, write_shards
from gligen.data.transforms import TransformConfig, image_to_tensor, transform_sample
from gligen.ldm import FrozenLDM

RES = 16
TOL = 1e-5
KPS = [[0.05 + 0.05 * k, 0.5, 2] for k in range(17)]  # the leftmost ones fall outside a centre crop of a wide image


ENTITY_ROWS = np.arange(12, dtype=np.float32).reshape(3, 4)


def _source_samples():
    # wide and tall images: the centre crop cuts them, so boxes and keypoints must move with it
    wide = make_sample("wide", caption="a red square and a blue circle", width=24, height=16, seed=1,
                       boxes=[(0.0, 0.1, 0.3, 0.9), (0.5, 0.2, 0.9, 0.8), (0.0, 0.0, 0.1, 0.5)],
                       phrases=["a red square", "a blue circle", "the green triangle"], persons=[KPS])
    wide["entity_embeds.npy"] = ENTITY_ROWS
    yield wide
    yield make_sample("tall", caption="the green triangle", width=16, height=22, seed=2,
                      boxes=[(0.1, 0.0, 0.9, 0.6)], phrases=["the green triangle"])
    yield make_sample("square", kind="detection_caption", caption="a circle", width=16, height=16, seed=3,
                      boxes=[(0.2, 0.2, 0.7, 0.7), (0.1, 0.5, 0.4, 0.9)], phrases=["circle", "square"])
    yield make_sample("big", caption="an red circle", width=40, height=32, seed=4,
                      boxes=[(0.3, 0.3, 0.6, 0.6)], phrases=["red circle"])


@pytest.fixture(scope="module")
def ldm(tiny_pretrained):
    return FrozenLDM(tiny_pretrained)


@pytest.fixture(scope="module")
def precomputed(tmp_path_factory, tiny_pretrained, ldm):
    root = tmp_path_factory.mktemp("precompute")
    write_shards(_source_samples(), root / "src", max_samples=3, progress=False)
    damaged = encode_sample(make_sample("damaged", seed=9))
    damaged["png"] = b"not a png"
    with wds.TarWriter(str(root / "damaged-000000.tar"), encoder=False) as tw:
        tw.write(damaged)
    spec = f"{root / 'src'}::{root / 'damaged-000000.tar'}"
    cfg = PrecomputeConfig(resolution=RES, flip=True, batch_size=3)
    index = precompute_shards(tiny_pretrained, spec, str(root / "out"), cfg, prefix="pre", max_samples=2,
                              progress=False, ldm=ldm)
    originals = {s.key: s for s in iter_samples(resolve_shards(str(root / "src")), SkipCounter(strict=True))}
    outputs = {s.key: s for s in iter_samples(resolve_shards(str(root / "out")), SkipCounter(strict=True))}
    raw = {r["__key__"]: r for url in resolve_shards(str(root / "out")) for r in iter_raw_samples(url, SkipCounter())}
    return {"root": root, "index": index, "originals": originals, "outputs": outputs, "raw": raw}


def _expected(ldm, original):
    """What the image path computes on the same decoded image, with validation's centre crop."""
    ex = transform_sample(original, TransformConfig(RES, random_flip=False), rng=None)
    px = ex["pixel_values"][None]
    post = ldm.vae.encode(px).latent_dist
    post_flip = ldm.vae.encode(px.flip(-1)).latent_dist
    n = int(ex["masks"].sum())
    caption = "" if original.annotation.kind == "detection" else original.caption
    return {"example": ex, "n": n, "latent_mean": post.mean[0], "latent_std": post.std[0],
            "latent_mean_flip": post_flip.mean[0], "latent_std_flip": post_flip.std[0],
            "caption_embeds": ldm.encode_captions([caption])[0],
            "phrase_embeds": ldm.encode_phrases([ex["phrases"][:n]])[0]}


def test_precompute_writes_every_valid_sample_and_counts_the_damaged_one(precomputed):
    assert precomputed["index"]["total"] == 4
    assert sorted(precomputed["outputs"]) == ["big", "square", "tall", "wide"]
    report = (precomputed["root"] / "out" / "precompute_report.json").read_text()
    assert '"bad_image": 1' in report


def test_arrays_equal_frozen_ldm_on_the_training_crop(precomputed, ldm):
    for key, original in precomputed["originals"].items():
        out, exp = precomputed["outputs"][key], _expected(ldm, original)
        for name in ("latent_mean", "latent_std", "latent_mean_flip", "latent_std_flip", "caption_embeds"):
            torch.testing.assert_close(torch.from_numpy(out.arrays[f"{name}.npy"]), exp[name], atol=TOL, rtol=0,
                                       msg=f"{key} {name}")
        torch.testing.assert_close(torch.from_numpy(out.arrays["phrase_embeds.npy"]), exp["phrase_embeds"],
                                   atol=TOL, rtol=0, msg=f"{key} phrase_embeds")


def test_annotation_is_rewritten_into_the_crop(precomputed, ldm):
    for key, original in precomputed["originals"].items():
        out = precomputed["outputs"][key]
        ann = out.annotation
        assert (ann.width, ann.height) == (RES, RES)
        # the stored image is the crop the latents encode
        ex = transform_sample(original, TransformConfig(RES, random_flip=False), rng=None)
        stored = Image.open(io.BytesIO(precomputed["raw"][key]["png"]))  # not decoded by the reader: latents win
        assert stored.size == (RES, RES)
        torch.testing.assert_close(image_to_tensor(stored), ex["pixel_values"])
        # latents path (identity geometry) gives the same boxes, phrases and keypoints as the image path
        lat = transform_sample(out, TransformConfig(RES, random_flip=False), rng=None)
        torch.testing.assert_close(lat["boxes"], ex["boxes"], atol=1e-6, rtol=0)
        assert lat["phrases"] == ex["phrases"]
        for name in ("keypoints", "keypoint_masks"):
            if name in ex:
                torch.testing.assert_close(lat[name], ex[name], atol=1e-6, rtol=0)
        assert out.arrays["phrase_embeds.npy"].shape[0] == len(ann.objects)
    wide = precomputed["outputs"]["wide"]
    # the strip at the left edge is outside the 16 px centre crop of 24 px; the rest are largest first
    assert [o.phrase for o in wide.annotation.objects] == ["a blue circle", "a red square"]
    np.testing.assert_array_equal(wide.arrays["entity_embeds.npy"], ENTITY_ROWS[[1, 0]])  # rows follow objects
    assert int((wide.annotation.persons[0].keypoints[:, 2] == 2).sum()) < 17  # leftmost keypoints cropped away


def test_datamodule_batches_carry_precomputed_arrays(precomputed, ldm):
    dm = GroundingDataModule(train_shards={"pre": str(precomputed["root"] / "out")}, resolution=RES, batch_size=2,
                             num_workers=0, batches_per_epoch=3, random_flip=False, shuffle_buffer=4)
    seen = set()
    for batch in dm.train_dataloader():
        assert "pixel_values" not in batch
        for name in ("latent_mean", "latent_std", "caption_embeds", "phrase_embeds"):
            assert name in batch, name
        for i, key in enumerate(batch["keys"]):
            seen.add(key)
            exp = _expected(ldm, precomputed["originals"][key])
            torch.testing.assert_close(batch["latent_mean"][i], exp["latent_mean"], atol=TOL, rtol=0)
            torch.testing.assert_close(batch["caption_embeds"][i], exp["caption_embeds"], atol=TOL, rtol=0)
            n = exp["n"]
            torch.testing.assert_close(batch["phrase_embeds"][i, :n], exp["phrase_embeds"], atol=TOL, rtol=0)
            assert torch.count_nonzero(batch["phrase_embeds"][i, n:]) == 0
            torch.testing.assert_close(batch["boxes"][i], exp["example"]["boxes"], atol=1e-6, rtol=0)
    assert len(seen) >= 2


def test_detection_gets_null_caption_embeds_and_drop_stores_no_image(tmp_path, tiny_pretrained, ldm):
    write_shards([make_sample("det", kind="detection", caption="", width=16, height=16, boxes=[(0.1, 0.1, 0.5, 0.5)],
                              phrases=["square"])], tmp_path / "src", progress=False)
    cfg = PrecomputeConfig(resolution=RES, image="drop", dtype="float16")
    precompute_shards(tiny_pretrained, str(tmp_path / "src"), str(tmp_path / "out"), cfg, progress=False, ldm=ldm)
    with tarfile.open(next((tmp_path / "out").glob("*.tar"))) as tar:
        raw_members = {m.name.split(".", 1)[1] for m in tar.getmembers()}
    assert not raw_members & {"png", "jpg", "webp"}
    assert not any(m.endswith("_flip.npy") for m in raw_members)
    (out,) = iter_samples(resolve_shards(str(tmp_path / "out")), SkipCounter(strict=True))
    assert out.arrays["caption_embeds.npy"].dtype == np.float16
    torch.testing.assert_close(torch.from_numpy(out.arrays["caption_embeds.npy"]).float(),
                               ldm.encode_captions([""])[0], atol=1e-2, rtol=1e-2)


def test_samples_with_latents_keep_them_and_get_fresh_embeddings(tmp_path, tiny_pretrained, ldm):
    src = make_sample("lat", caption="a red circle", latents=True, width=16, height=16, embed_dim=5,
                      boxes=[(0.0, 0.0, 0.05, 0.05)], phrases=["circle"])  # tiny box: kept, geometry is fixed
    write_shards([src], tmp_path / "src", progress=False)
    precompute_shards(tiny_pretrained, str(tmp_path / "src"), str(tmp_path / "out"), PrecomputeConfig(RES),
                      progress=False, ldm=ldm)
    (out,) = iter_samples(resolve_shards(str(tmp_path / "out")), SkipCounter(strict=True))
    np.testing.assert_array_equal(out.arrays["latent_mean.npy"], src["latent_mean.npy"])
    np.testing.assert_array_equal(out.arrays["latent_mean_flip.npy"], src["latent_mean_flip.npy"])
    assert out.annotation == decode_sample(encode_sample(src)).annotation
    torch.testing.assert_close(torch.from_numpy(out.arrays["caption_embeds.npy"]),
                               ldm.encode_captions(["a red circle"])[0], atol=TOL, rtol=0)
    assert out.arrays["phrase_embeds.npy"].shape == (1, ldm.text_encoder.config.hidden_size)


def test_precompute_refuses_to_write_over_its_input(tmp_path):
    """--out equal to --shards would truncate the input; refused before any model loads, input untouched."""
    write_shards([make_sample("a", width=16, height=16, boxes=[(0.1, 0.1, 0.5, 0.5)])], tmp_path / "src",
                 progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "src").iterdir()}
    with pytest.raises(ValueError, match=r"--out .*src holds the input shards"):
        precompute_shards("no-model-needed", str(tmp_path / "src"), str(tmp_path / "src"), PrecomputeConfig(16))
    assert {p.name: p.read_bytes() for p in (tmp_path / "src").iterdir()} == before
