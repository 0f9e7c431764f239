"""The toy build end to end at test size: shards + a pretrained-by-us LDM loadable through the `pretrained` path."""

import json
from dataclasses import asdict, replace

import pytest
import torch

from gligen.data.shards import resolve_shards
from gligen.evaluation.generate import load_layouts
from gligen.ldm import FrozenLDM
from gligen.toy import world
from gligen.toy.build import (
    ToyBuildConfig,
    build,
    build_record,
    is_shipped_config,
    ldm_dir,
    shard_dir,
    styled_shard_dir,
)
from gligen.toy.pretrain import toy_vocabulary
from gligen.toy.world import CAPTION_TEMPLATES, COLOURS, SHAPES, STYLES, WORLD_VERSION
from tests.helpers import TINY

PERSONS = {"train": 8, "val": 4}
STYLED = {"val": 4}  # styled val layouts only: the report's style read-back, pretraining unchanged


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory):
    config = ToyBuildConfig(splits={"train": {"grounding": 24, "detection": 8, "detection_caption": 8},
                                    "val": {"grounding": 8}}, person_splits=PERSONS, styled_splits=STYLED,
                            shard_size=16, pretrain=TINY)
    out = tmp_path_factory.mktemp("toy")
    build(out, config, log=lambda *a: None)
    return out


def test_build_writes_every_split_and_a_loadable_pipeline(toy_cache):
    assert len(resolve_shards(str(shard_dir(toy_cache, "train", "grounding")))) == 2  # 24 samples, 16 per shard
    index = json.loads((shard_dir(toy_cache, "val", "grounding") / "index.json").read_text())
    assert index["total"] == 8 and index["kinds"] == {"grounding": 8}
    ldm = FrozenLDM(str(ldm_dir(toy_cache)))
    assert ldm.unet.config.sample_size == 8 and ldm.vae.config.scaling_factor != 0.18215  # measured, not copied
    assert (ldm_dir(toy_cache) / "clip" / "config.json").exists()
    # the toy CLIP saw pixels in [-1, 1]: image entities must be normalised the same way
    assert ldm.encode_entity_images(torch.zeros(1, 3, 32, 32)).shape == (1, 32)
    assert ldm._clip_preprocessing["mean"] == ldm._clip_preprocessing["std"] == (0.5, 0.5, 0.5)
    latents = ldm.encode_images(torch.zeros(1, 3, 32, 32))
    assert latents.shape == (1, 4, 8, 8)


def test_build_is_cached(toy_cache):
    before = (ldm_dir(toy_cache) / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    messages = []
    build(toy_cache, ToyBuildConfig(splits={"train": {"grounding": 24, "detection": 8, "detection_caption": 8},
                                            "val": {"grounding": 8}}, person_splits=PERSONS, styled_splits=STYLED,
                                    shard_size=16, pretrain=TINY),
          log=messages.append)
    assert messages == []  # nothing rewritten
    assert (ldm_dir(toy_cache) / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == before


def test_every_toy_caption_word_is_one_token(toy_cache):
    ldm = FrozenLDM(str(ldm_dir(toy_cache)))
    words = list(COLOURS) + list(SHAPES) + list(STYLES) + CAPTION_TEMPLATES[1].replace("{}", "").split()
    for word in words:
        assert len(ldm.tokenizer(word).input_ids) == 3, word  # BOS, the word, EOS
    assert set(words) <= set(toy_vocabulary())


def test_yaml_config_is_checked(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text("pretrain: {unet_stepz: 3}\n")
    with pytest.raises(ValueError, match="unet_stepz"):
        ToyBuildConfig.from_yaml(path)
    path.write_text("resolution: 32\npretrain: {vae_channels: [8, 16], unet_steps: 7}\n")
    config = ToyBuildConfig.from_yaml(path)
    assert config.pretrain.vae_channels == (8, 16) and config.pretrain.unet_steps == 7


def test_toy_report_measures_evaluators_vae_and_base(toy_cache, tmp_path):
    from gligen.toy.report import evaluate_toy, write_report

    results = evaluate_toy(toy_cache, num_images=8, steps=4, num_persons=4)
    # the evaluators are exact on real toy images; an untrained (test-size) LDM draws nothing readable
    assert results["evaluator_real_boxes"]["ap50"] == 1.0 and results["evaluator_real_keypoints"]["pck"] == 1.0
    assert results["base_ldm_captions_only"]["ap50"] < 0.5
    # the VAE ceilings: person scenes reconstructed at the build's resolution and read back by joint colour
    assert 0.0 <= results["vae_reconstruction_persons"]["pck"] < 0.5
    assert set(results["base_ldm_one_object_captions"]) == {"colour_recall", "shape_accuracy_given_colour"}
    assert -1.0 <= results["text_encoder_word_similarity"]["shape_word_cosine"] <= 1.0
    assert {"base_ldm_from_noised_real_strength0.3", "base_ldm_from_noised_real_strength0.5_shape_words_swapped"} \
        <= set(results)
    # the quality measure: exactly 0 on real images, above it on reconstructions; the toy CLIP's zero-shot check
    assert results["quality_fidelity_error"]["real"] == 0.0 < results["quality_fidelity_error"]["vae_reconstruction"]
    assert set(results["quality_ordering"]) >= {"ordered", "base_ldm_minus_vae_reconstruction_in_sem"}
    assert 0.0 <= results["toy_clip_zero_shot_single_objects"]["shape_accuracy"] <= 1.0
    assert results["style_read_back"]["real"] == 1.0 and "base_ldm_striped" in results["style_read_back"]
    write_report(results, tmp_path)
    assert "evaluator_real_boxes" in (tmp_path / "README.md").read_text()
    assert (tmp_path / "metrics.json").exists()


def test_swap_shape_words_changes_every_shape_and_nothing_else():
    from gligen.toy.report import swap_shape_words

    assert swap_shape_words("there is a red square, a blue cross and a cyan circle") == \
        "there is a red circle, a blue square and a cyan triangle"
    assert swap_shape_words("a person") == "a person"


def test_build_refuses_a_cached_ldm_pretrained_with_other_settings(toy_cache):

    config = ToyBuildConfig(splits={"train": {"grounding": 24, "detection": 8, "detection_caption": 8},
                                    "val": {"grounding": 8}}, person_splits=PERSONS, styled_splits=STYLED,
                            shard_size=16, pretrain=replace(TINY, unet_steps=4))
    with pytest.raises(ValueError, match=r"toy_pretrain.json.*unet_steps.*\[3\] cached vs \[4\]"):
        build(toy_cache, config, log=lambda *a: None)


def test_the_styled_family_is_base_pretraining_data_and_the_default_world_is_still_the_shipped_one(tmp_path):
    """styled_splits: shards/<split>-styled, pretrained on by the base (train); the default config (none) keeps the
    build record the shipped LDM was made for."""
    config = ToyBuildConfig(splits={"train": {"grounding": 8}, "val": {"grounding": 4}}, person_splits={},
                            styled_splits={"train": 8, "val": 4}, shard_size=16, pretrain=TINY)
    build(tmp_path, config, log=lambda *a: None)
    record = json.loads((ldm_dir(tmp_path) / "toy_pretrain.json").read_text())
    assert record["train_shards"] == ["train-grounding", "train-styled"] and record["train_images"] == 16
    assert json.loads((styled_shard_dir(tmp_path, "val") / "index.json").read_text())["total"] == 4
    assert build_record(ToyBuildConfig())["styled_splits"] == {"train": 8000, "val": 200}  # the default world's
    assert not is_shipped_config(replace(ToyBuildConfig(), styled_splits={"train": 8}))


def test_base_ldm_is_pretrained_on_person_scenes_too(toy_cache):
    record = json.loads((ldm_dir(toy_cache) / "toy_pretrain.json").read_text())
    assert record["train_images"] == 24 + 8 + 8 + PERSONS["train"]
    assert "train-persons" in record["train_shards"] and record["world_version"] == WORLD_VERSION
    # where the build's time went, stage by stage (the build budget is quoted from these)
    assert list(record["stage_seconds"]) == ["data", "clip", "vae", "unet"]
    assert sum(record["stage_seconds"].values()) == pytest.approx(record["seconds"], abs=1.0)
    # the same settings without person training data describe another base: refused, naming the key
    config = ToyBuildConfig(splits={"train": {"grounding": 24, "detection": 8, "detection_caption": 8},
                                    "val": {"grounding": 8}}, person_splits={"val": 4}, styled_splits=STYLED,
                            shard_size=16, pretrain=TINY)
    with pytest.raises(ValueError, match=r"toy_pretrain.json.*train_shards"):
        build(toy_cache, config, log=lambda *a: None)


def test_build_refuses_shards_drawn_by_another_world_version(toy_cache, tmp_path):
    old = json.loads((toy_cache / "build_config.json").read_text())
    assert old["world_version"] == WORLD_VERSION
    del old["world_version"]  # as written before versions were recorded
    (tmp_path / "build_config.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match=rf"build_config.json.*version 1, this code draws version {WORLD_VERSION}"):
        build(tmp_path, ToyBuildConfig(splits={"train": {"grounding": 2}}, styled_splits={}, pretrain=TINY),
              log=lambda *a: None)
    assert not (tmp_path / "shards").exists()  # refused before writing anything


class _OneHotText:
    """A text 'encoder' whose state at each position is the one-hot of its token (tokens 0..vocab-1)."""

    def __init__(self, ldm, collapse_shapes: bool):
        self.tokenizer, self.collapse = ldm.tokenizer, collapse_shapes
        self.shape_ids = {ldm.tokenizer(s).input_ids[1] for s in SHAPES}

    def tokenize(self, texts):
        return self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              return_tensors="pt").input_ids

    def text_encoder(self, ids):
        if self.collapse:  # every shape word the same token: the UNet could not tell shapes apart
            ids = ids.clone()
            ids[torch.isin(ids, torch.tensor(sorted(self.shape_ids)))] = min(self.shape_ids)
        states = torch.nn.functional.one_hot(ids, len(self.tokenizer)).float()
        return type("Out", (), {"last_hidden_state": states})()


def test_word_similarity_reads_the_shape_and_colour_word_states(toy_cache):
    from gligen.toy.report import word_similarity

    ldm = FrozenLDM(str(ldm_dir(toy_cache)))
    distinct = word_similarity(_OneHotText(ldm, collapse_shapes=False))
    assert distinct == {"shape_word_cosine": 0.0, "colour_word_cosine": 0.0}
    collapsed = word_similarity(_OneHotText(ldm, collapse_shapes=True))
    assert collapsed["shape_word_cosine"] == pytest.approx(1.0) and collapsed["colour_word_cosine"] == 0.0


def test_object_geometry_is_a_world_setting_that_a_cache_remembers(tmp_path):
    """object_geometry draws the objects and styled families with other sizes and counts; the pretrained base
    records it, and a cache drawn with another geometry is refused, naming the setting, before anything is written."""
    big = {"min_side": 0.5, "max_side": 0.7, "max_objects": 2}
    config = ToyBuildConfig(splits={"train": {"grounding": 12}, "val": {"grounding": 12}}, person_splits={},
                            styled_splits={"val": 6}, object_geometry=big, shard_size=16, pretrain=TINY)
    build(tmp_path, config, log=lambda *a: None)
    for directory in (shard_dir(tmp_path, "val", "grounding"), styled_shard_dir(tmp_path, "val")):
        layouts, _ = load_layouts(str(directory), 32)
        assert layouts and all(1 <= len(layout["objects"]) <= 2 for layout in layouts)
        sides = [(x1 - x0) * 32 for layout in layouts for x0, _, x1, _ in (o["box"] for o in layout["objects"])]
        assert min(sides) >= round(0.5 * 32) - 1e-6 and max(sides) <= round(0.7 * 32) + 1e-6
    assert json.loads((ldm_dir(tmp_path) / "toy_pretrain.json").read_text())["object_geometry"] == big
    with pytest.raises(ValueError, match=r"build_config.json.*object_geometry.*'max_side': 0.7.*cached vs .*"
                                         r"'max_side': 0.75.* asked"):
        build(tmp_path, replace(config, object_geometry={}), log=lambda *a: None)  # {}: the world's defaults
    assert not is_shipped_config(replace(ToyBuildConfig(), object_geometry=big))
    # the record always holds the whole geometry: keys left out take the world's defaults
    assert build_record(ToyBuildConfig())["object_geometry"] == asdict(world.DEFAULT_GEOMETRY)
    assert ToyBuildConfig(object_geometry={"max_objects": 3}).object_geometry == \
        {**asdict(world.DEFAULT_GEOMETRY), "max_objects": 3}


def test_object_geometry_settings_are_checked():
    with pytest.raises(ValueError, match="max_object"):
        ToyBuildConfig(object_geometry={"max_object": 2})
    with pytest.raises(ValueError, match="min_side <= max_side"):
        ToyBuildConfig(object_geometry={"min_side": 0.8, "max_side": 0.5})


def test_probe_base_pretrains_a_unet_for_the_asked_world_on_a_built_vae(toy_cache, tmp_path):
    from gligen.toy.__main__ import main

    config = tmp_path / "world.yaml"
    config.write_text("object_geometry: {min_side: 0.5, max_side: 0.7, max_objects: 1}\n"
                      "pretrain: {unet_steps: 2, batch_size: 4, unet_channels: [16, 32, 32], attention_heads: 2}\n")
    out = tmp_path / "probe.json"
    main(["probe-base", "--ldm", str(ldm_dir(toy_cache)), "--config", str(config), "--num-images", "8",
          "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["data"] == {"scenes": 8, "mean_objects_per_scene": 1.0,
                              "object_geometry": {"min_side": 0.5, "max_side": 0.7, "max_objects": 1}}
    assert result["setup"]["pretrain"]["unet_steps"] == 2 and "probe-base" in result["setup"]["command"]
    for key in ("base_ldm_one_object_captions", "vae_reconstruction_single_objects"):
        assert set(result[key]) == {"colour_recall", "shape_accuracy_given_colour"}
