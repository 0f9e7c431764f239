"""Official TSV image embeddings -> entity_embeds.npy (convert official_tsv --image-embeddings after_reproject), and a
text_image model trained one step on a TSV converted that way."""

import base64
import io
import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from transformers import CLIPConfig, CLIPModel

from gligen.data.__main__ import main as data_main
from gligen.data.convert.official_tsv import convert_official_tsv
from gligen.data.decode import SkipCounter
from gligen.data.shards import iter_samples, resolve_shards
from tests.helpers import tiny_train_config

PROJ = 16  # CLIP projection width != text width (32): the orientation of the text projection matters
TEXT = 32
TOL = 1e-5
WRITE = {"max_samples": 3, "progress": False}


@pytest.fixture(scope="module")
def ldm_dir(tmp_path_factory):
    """An 'LDM directory' holding only clip/: a tiny CLIPModel (text width 32, projection 16)."""
    root = tmp_path_factory.mktemp("tsv_ldm")
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(
        text_config={"vocab_size": 99, "hidden_size": TEXT, "intermediate_size": 37, "num_hidden_layers": 1,
                     "num_attention_heads": 4, "max_position_embeddings": 77},
        vision_config={"image_size": 16, "patch_size": 8, "hidden_size": 32, "intermediate_size": 37,
                       "num_hidden_layers": 1, "num_attention_heads": 4},
        projection_dim=PROJ)).save_pretrained(root / "clip")
    return root


def official_after_reproject(clip_dir, embedding) -> torch.Tensor:
    """dataset/tsv_dataset.py `mapping` with which_layer_image="after_reproject", its projection_matrix being the
    CLIP text projection's Linear weight: project(x.unsqueeze(0), P.T) = x @ transpose(P.T), / norm, * 28.7."""
    weight = CLIPModel.from_pretrained(clip_dir).text_projection.weight.detach()
    x = torch.as_tensor(np.asarray(embedding, dtype=np.float32)).unsqueeze(0)
    y = (x @ torch.transpose(weight.T, 0, 1)).squeeze(0)
    return y / y.norm() * 28.7


def _png_b64(width, height, seed):
    arr = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _unit(dim, seed):
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def _b64(vec):  # the official storage: base64 of the float32 bytes
    return base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode()


def _row(row_id, item):
    return f"{row_id}\t{json.dumps(item)}\n"


def _read(out_dir):
    return {s.key: s for s in iter_samples(resolve_shards(str(out_dir)), SkipCounter(strict=True))}


def _tsv(path, dim):
    """Rows with embeddings of length `dim`; returns {sample key: [embedding or None per written object]}."""
    e = {k: _unit(dim, k) for k in range(10)}
    caption = "a red square and a blue circle"
    img = _png_b64(40, 32, 0)
    rows = {
        "g1": {"data_id": "g1", "image": img, "caption": caption, "annos": [
            {"bbox": [2, 2, 10, 10], "tokens_positive": [[0, 12]], "image_embedding_after": _b64(e[0]),
             "text_embedding_before": _b64(e[9])},
            {"bbox": [20, 8, 16, 20], "tokens_positive": [[17, 30]], "image_embedding_after": e[1].tolist()},  # list
            {"bbox": [0, 0, 0, 4], "tokens_positive": [[0, 5]], "image_embedding_after": "!!"},  # dropped object
        ]},
        "d1": {"data_id": "d1", "image": _png_b64(32, 40, 1), "is_det": True, "annos": [
            {"bbox": [1, 1, 20, 20], "category_name": "chair", "image_embedding_after": _b64(e[2])},
            {"bbox": [10, 20, 12, 12], "category_name": "lamp"},  # no embedding: zero row
            {"bbox": [4, 4, 10, 10], "category_name": "cup", "image_embedding_after": [0.0] * dim},  # zero: zero row
        ]},
        "n1": {"data_id": "n1", "image": img, "caption": "a cat", "annos": [  # none at all: all-zero rows
            {"bbox": [2, 2, 20, 20], "tokens_positive": [[0, 5]]}]},
    }
    bad = {
        "b_len": _b64(e[3][:-1]),  # one value short
        "b_nan": [float("nan")] + e[4][1:].tolist(),
        "b_type": {"not": "numbers"},
        "b_bool": [True] * dim,
        "b_b64": "***",
    }
    lines = [_row(k, v) for k, v in rows.items()]
    for k, value in bad.items():
        lines.append(_row(k, {"data_id": k, "image": img, "caption": caption, "annos": [
            {"bbox": [2, 2, 10, 10], "tokens_positive": [[0, 12]], "image_embedding_after": _b64(e[5])},
            {"bbox": [20, 8, 16, 20], "tokens_positive": [[17, 30]], "image_embedding_after": value}]}))
    path.write_text("".join(lines))
    return {"tsv-g1": [e[0], e[1]], "tsv-d1": [e[2], None, None], "tsv-n1": [None]}, list(bad)


def test_entity_embeds_are_the_official_after_reproject_mapping(ldm_dir, tmp_path):
    expected, bad = _tsv(tmp_path / "data.tsv", PROJ)
    _, report = convert_official_tsv([str(tmp_path / "data.tsv")], str(tmp_path / "out"),
                                     image_embeddings="after_reproject", clip=str(ldm_dir), **WRITE)
    samples = _read(tmp_path / "out")
    assert sorted(samples) == sorted(expected)
    for key, embeddings in expected.items():
        rows = samples[key].arrays["entity_embeds.npy"]
        assert rows.dtype == np.float32 and rows.shape == (len(samples[key].annotation.objects), TEXT), key
        for row, embedding in zip(rows, embeddings):
            if embedding is None:
                assert not row.any(), key  # zero row: "no entity image" (entity masks come from non-zero rows)
            else:
                torch.testing.assert_close(torch.from_numpy(row), official_after_reproject(ldm_dir / "clip",
                                                                                           embedding),
                                           atol=TOL, rtol=0)
    assert "phrase_embeds.npy" not in samples["tsv-g1"].arrays  # text embeddings are not read
    assert report.skipped == {"bad_image_embedding": len(bad)}
    named = report.examples["bad_image_embedding"]
    for k, line in zip(bad, range(4, 4 + len(bad))):  # 1-based line numbers, row ids and the anno index
        assert any(f"data.tsv row {line}: row id {k} annos[1] image_embedding_after" in e for e in named), (k, named)
    assert "15 values, the CLIP projects 16" in " ".join(named)
    assert report.notes == {"no_image_embedding": 2, "zero_image_embedding": 1}
    assert report.dropped == {"zero_area_box": 1}  # a dropped object's (bad) embedding is never read

    # default: embeddings ignored, no entity_embeds
    convert_official_tsv([str(tmp_path / "data.tsv")], str(tmp_path / "plain"), **WRITE)
    assert not any("entity_embeds.npy" in s.arrays for s in _read(tmp_path / "plain").values())


def test_cli_takes_the_ldm_or_the_clip_directory_and_a_wrong_clip_is_a_clear_error(ldm_dir, tmp_path, capsys):
    _tsv(tmp_path / "data.tsv", PROJ)
    outs = {}
    for name, clip in (("ldm", ldm_dir), ("clip", ldm_dir / "clip")):
        assert data_main(["convert", "official_tsv", str(tmp_path / "data.tsv"), "--out", str(tmp_path / name),
                          "--image-embeddings", "after_reproject", "--clip", str(clip), "--no-progress"]) == 0
        outs[name] = _read(tmp_path / name)
    for key in outs["ldm"]:
        np.testing.assert_array_equal(outs["ldm"][key].arrays["entity_embeds.npy"],
                                      outs["clip"][key].arrays["entity_embeds.npy"])
    with pytest.raises(SystemExit, match="needs --clip"):
        data_main(["convert", "official_tsv", str(tmp_path / "data.tsv"), "--out", str(tmp_path / "x"),
                   "--image-embeddings", "after_reproject"])
    with pytest.raises(ValueError, match="neither a CLIP model directory"):
        convert_official_tsv([str(tmp_path / "data.tsv")], str(tmp_path / "x"), image_embeddings="after_reproject",
                             clip=str(tmp_path))
    # embeddings of another CLIP (768 in the official files): refused before anything is written
    _tsv(tmp_path / "wide.tsv", 24)
    with pytest.raises(ValueError, match=r"\{24: \d+, 23: 1\} values .* projects to 16"):
        convert_official_tsv([str(tmp_path / "wide.tsv")], str(tmp_path / "wide"),
                             image_embeddings="after_reproject", clip=str(ldm_dir), **WRITE)
    assert not (tmp_path / "wide").exists()


def _toy_tsv(path, clip_dir, n=6):
    """n grounding rows (48 x 40 images, 2 annos with unit image embeddings of the toy CLIP's projection width)."""
    dim = CLIPModel.from_pretrained(clip_dir).config.projection_dim
    caption = "a red square and a blue circle"
    lines = [_row(i, {"data_id": f"t{i}", "image": _png_b64(48, 40, 10 + i), "caption": caption, "annos": [
        {"bbox": [2, 2, 20, 20], "tokens_positive": [[0, 12]], "image_embedding_after": _b64(_unit(dim, 2 * i))},
        {"bbox": [24, 10, 20, 24], "tokens_positive": [[17, 30]],
         "image_embedding_after": _b64(_unit(dim, 2 * i + 1))}]}) for i in range(n)]
    path.write_text("".join(lines))


@pytest.mark.slow
def test_a_tsv_with_image_embeddings_trains_a_text_image_model_one_step(tiny_toy_world, tmp_path, monkeypatch):
    from gligen.module import GLIGENModule
    from gligen.training.cli import fit_from_config

    clip_dir = tiny_toy_world / "ldm" / "clip"
    _toy_tsv(tmp_path / "toy.tsv", clip_dir)
    _, report = convert_official_tsv([str(tmp_path / "toy.tsv")], str(tmp_path / "shards"),
                                     image_embeddings="after_reproject", clip=str(tiny_toy_world / "ldm"), **WRITE)
    assert report.written == 6 and not report.skipped

    path = tiny_train_config(tmp_path, tiny_toy_world, "text_image", steps=1, validate=False)
    config = yaml.safe_load(path.read_text())
    data = config["data"]["init_args"]
    data["train_shards"] = {"tsv": str(tmp_path / "shards")}
    data.pop("ratios", None)
    path.write_text(yaml.safe_dump(config))

    seen, losses = [], []
    original = GLIGENModule.training_step

    def recording(self, batch, batch_idx):
        seen.append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in batch.items()})
        loss = original(self, batch, batch_idx)
        losses.append(float(loss.detach()))
        return loss

    monkeypatch.setattr(GLIGENModule, "training_step", recording)
    checkpoint = fit_from_config(str(path))
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 1
    assert len(seen) == 1 and np.isfinite(losses).all()
    batch = seen[0]
    assert "entity_embeds" in batch and "entity_pixel_values" not in batch
    embeds, masks = batch["entity_embeds"], batch["masks"]
    assert embeds.shape == (*masks.shape, 32)
    norms = embeds.norm(dim=-1)
    torch.testing.assert_close(norms[masks > 0], torch.full_like(norms[masks > 0], 28.7), atol=1e-4, rtol=0)
    assert not embeds[masks == 0].any()


def test_precompute_keeps_the_tsv_entity_rows_of_the_kept_objects(tiny_toy_world, tmp_path):
    from gligen.data.convert.precompute import PrecomputeConfig, precompute_shards

    _toy_tsv(tmp_path / "toy.tsv", tiny_toy_world / "ldm" / "clip", n=2)
    convert_official_tsv([str(tmp_path / "toy.tsv")], str(tmp_path / "shards"), image_embeddings="after_reproject",
                         clip=str(tiny_toy_world / "ldm"), **WRITE)
    precompute_shards(str(tiny_toy_world / "ldm"), str(tmp_path / "shards"), str(tmp_path / "pre"),
                      PrecomputeConfig(32, max_objects=1), progress=False)  # keeps only the larger object
    before, after = _read(tmp_path / "shards"), _read(tmp_path / "pre")
    assert sorted(before) == sorted(after)
    for key, out in after.items():
        rows = {o.phrase: r for o, r in zip(before[key].annotation.objects, before[key].arrays["entity_embeds.npy"])}
        assert [o.phrase for o in out.annotation.objects] == ["a blue circle"]
        np.testing.assert_array_equal(out.arrays["entity_embeds.npy"], rows["a blue circle"][None])
        assert "latent_mean.npy" in out.arrays and "phrase_embeds.npy" in out.arrays
