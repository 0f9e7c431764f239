"""`preset: paper | official` (gligen/presets.py): each official behaviour observed where it acts, each setting
switchable on its own, and the README table in step with the presets."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from gligen import presets
from gligen.data.collate import collate_batch
from gligen.data.convert.coco import ENTITY_PAD, entity_crop
from gligen.data.datamodule import GroundingDataModule
from gligen.data.decode import SkipCounter
from gligen.data.schema import Annotation, DecodedSample, ObjectAnnotation, PersonAnnotation
from gligen.data.transforms import DataConfigError, TransformConfig, transform_or_skip, transform_sample
from gligen.module import GLIGENModule
from tests.helpers import ROOT, save_like_lightning


def test_resolve_fills_only_what_is_left_at_none():
    assert presets.resolve("paper", "box", caption_dropout=None) == {"caption_dropout": 0.1}
    assert presets.resolve("official", "box", caption_dropout=None) == {"caption_dropout": 0.5}
    assert presets.resolve("official", "keypoint", caption_dropout=None) == {"caption_dropout": 0.0}
    assert presets.resolve("official", "box", caption_dropout=0.2) == {"caption_dropout": 0.2}
    official = presets.resolve("official", "image", alpha_type=None, sampler=None, negative_prompt=None)
    assert official == {"alpha_type": (1.0, 0.0, 0.0), "sampler": "plms",
                        "negative_prompt": presets.OFFICIAL_NEGATIVE_PROMPT}
    assert presets.resolve("official", "box", alpha_type=None)["alpha_type"] == (0.3, 0.0, 0.7)
    with pytest.raises(ValueError, match="preset must be one of"):
        presets.resolve("mine", "box", sampler=None)


# ----- model: caption dropout and grounding dropout -------------------------------------------------------------

def test_official_preset_drops_half_the_captions_and_the_whole_batch_grounding(tiny_pretrained):
    torch.manual_seed(0)
    paper = GLIGENModule(tiny_pretrained)
    official = GLIGENModule(tiny_pretrained, preset="official")
    assert (paper.hparams.caption_dropout, paper.hparams.grounding_dropout_mode) == (0.1, "per_sample")
    assert (official.hparams.caption_dropout, official.hparams.grounding_dropout_mode) == (0.5, "per_batch")
    draws = [official.dropout_masks(16) for _ in range(300)]
    captions = torch.stack([c for c, _ in draws]).float()
    assert 0.46 < captions.mean() < 0.54  # over 4800 captions
    assert all(g.all() or not g.any() for _, g in draws)  # one coin for the whole batch
    assert 0.06 < sum(bool(g[0]) for _, g in draws) / 300 < 0.14
    paper_draws = [paper.dropout_masks(16) for _ in range(300)]
    assert 0.08 < torch.stack([c for c, _ in paper_draws]).float().mean() < 0.12
    assert any(0 < g.sum() < 16 for _, g in paper_draws)  # per sample: batches mix dropped and kept
    # each setting on its own: an explicit value wins over the preset; hparams record what was resolved
    mixed = GLIGENModule(tiny_pretrained, preset="official", caption_dropout=0.1)
    assert (mixed.hparams.caption_dropout, mixed.hparams.grounding_dropout_mode) == (0.1, "per_batch")


# ----- data: detection captions, keypoint slots and captions ----------------------------------------------------

def detection_sample(kind="detection", caption=""):
    objects = (ObjectAnnotation((0.0, 0.0, 0.3, 0.3), "cat", "cat"),  # small
               ObjectAnnotation((0.2, 0.2, 0.9, 0.9), "dog", "dog"),  # largest: first
               ObjectAnnotation((0.5, 0.0, 1.0, 0.5), "a ball", None))  # no category: its phrase
    ann = Annotation(kind=kind, source_id="s", width=16, height=16, objects=objects)
    return DecodedSample(key="k", url="shard.tar", annotation=ann, caption=caption,
                         image=Image.new("RGB", (16, 16)))


def test_category_name_captions_for_detection_data_reach_the_text_encoder(tiny_pretrained):
    names = transform_sample(detection_sample(), TransformConfig(16, detection_captions="category_names"))
    assert names["caption"] == "dog, a ball, cat" and names["category_caption"]
    null = transform_sample(detection_sample(), TransformConfig(16))
    assert null["caption"] == "" and "category_caption" not in null
    captioned = transform_sample(detection_sample("detection_caption", "two pets"),
                                 TransformConfig(16, detection_captions="category_names"))
    assert captioned["caption"] == "two pets"  # only detection data gets category names

    module = GLIGENModule(tiny_pretrained, preset="official")
    batch = collate_batch([names, null])
    assert batch["category_captions"] == [True, False]
    context = module.batch_captions(batch, torch.tensor([False, False]))
    expected = module.ldm.encode_captions(["dog, a ball, cat", ""])
    assert torch.allclose(context, expected)  # the written caption kept, the other detection sample nulled
    # precomputed caption features (of the data's own caption "") are replaced for the written rows
    stored = {**batch, "caption_embeds": module.ldm.encode_captions(["", ""])}
    assert torch.allclose(module.batch_captions(stored, torch.tensor([False, False])), expected)
    assert torch.allclose(module.batch_captions(stored, torch.tensor([True, False]))[0], expected[1])


def person(x0, x1, visible, box=None):
    kps = np.zeros((17, 3), dtype=np.float32)
    for k in range(visible):
        kps[k] = [x0 + (x1 - x0) * k / 16, 0.5, 2]
    return PersonAnnotation(keypoints=kps, box=box)


def keypoint_sample(persons, kind="detection_caption", caption="people"):
    ann = Annotation(kind=kind, source_id="s", width=16, height=16,
                     objects=(ObjectAnnotation((0.1, 0.1, 0.9, 0.9), "person", "person"),), persons=tuple(persons))
    return DecodedSample(key="k", url="shard.tar", annotation=ann, caption=caption, image=Image.new("RGB", (16, 16)))


def test_keypoint_slots_most_visible_or_largest():
    persons = [person(0.4, 0.5, 17, box=(0.4, 0.1, 0.5, 0.9)),   # most keypoints, small box
               person(0.0, 0.9, 5, box=(0.0, 0.0, 1.0, 1.0)),    # fewest keypoints, largest box
               person(0.2, 0.7, 10)]                             # no box: its keypoints span 0.2-0.7 x 0
    def first_slot_counts(**kw):
        out = transform_sample(keypoint_sample(persons), TransformConfig(16, max_persons=1, random_flip=False, **kw))
        return int(out["keypoint_masks"][0].sum())
    assert first_slot_counts() == 17
    assert first_slot_counts(keypoint_slots="largest") == 5
    two = transform_sample(keypoint_sample(persons[1:]), TransformConfig(16, max_persons=1, keypoint_slots="largest"))
    assert int(two["keypoint_masks"][0].sum()) == 5  # a box beats a zero-height keypoint extent
    no_boxes = [person(0.4, 0.5, 17), person(0.0, 0.9, 5)]
    wide = transform_sample(keypoint_sample(no_boxes), TransformConfig(16, max_persons=1, keypoint_slots="largest"))
    assert int(wide["keypoint_masks"][0].sum()) == 17  # both extents have zero height: ties keep input order


def test_keypoint_captions_required_refuses_caption_less_data():
    persons = [person(0.2, 0.6, 17)]
    required = TransformConfig(16, keypoint_captions="required")
    assert transform_sample(keypoint_sample(persons), required)["caption"] == "people"
    assert transform_sample(keypoint_sample(persons, "detection", ""), TransformConfig(16))["caption"] == ""
    with pytest.raises(DataConfigError, match="shard.tar key k: keypoint_captions is 'required'.*--captions"):
        transform_or_skip(keypoint_sample(persons, "detection", ""), required, None, SkipCounter())
    skips = SkipCounter()  # one captioned-kind sample without its caption: a counted skip, not the end of the run
    assert transform_or_skip(keypoint_sample(persons, "detection_caption", " "), required, None, skips) is None
    assert skips.counts["transform_error"] == 1


def test_data_module_follows_its_preset_and_each_setting_overrides():
    official = GroundingDataModule(resolution=16, preset="official")
    assert (official.train_cfg.detection_captions, official.train_cfg.keypoint_slots,
            official.val_cfg.keypoint_captions) == ("category_names", "largest", "required")
    paper = GroundingDataModule(resolution=16, keypoint_slots="largest")
    assert (paper.train_cfg.detection_captions, paper.train_cfg.keypoint_slots) == ("null", "largest")
    assert paper.hparams.keypoint_captions == "optional"
    with pytest.raises(ValueError, match="keypoint_slots must be one of"):
        GroundingDataModule(resolution=16, keypoint_slots="tallest")


def test_entity_crop_stretch_fills_the_square_pad_keeps_the_aspect():
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[2:10, 4:14] = (200, 10, 10)  # a 10 x 8 red box
    box = [4 / 40, 2 / 20, 14 / 40, 10 / 20]
    stretched = np.asarray(entity_crop(Image.fromarray(arr), box, 10, "stretch"))
    padded = np.asarray(entity_crop(Image.fromarray(arr), box, 10))
    assert stretched.shape == padded.shape == (10, 10, 3)
    assert (np.abs(stretched.astype(int) - (200, 10, 10)).max(-1) < 30).all()  # every pixel the box's colour
    assert (padded[0] == ENTITY_PAD).all()  # the padded crop's top row is padding
    with pytest.raises(ValueError, match="entity crop mode"):
        entity_crop(Image.fromarray(arr), box, 10, "squash")


# ----- the README table -----------------------------------------------------------------------------------------

def test_readme_table_lists_every_setting_with_both_presets():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Presets: `preset: paper | official`"):]
    section = section[:section.index("\n## ")]
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([a-z_]+)` \|.*$", section, re.M)}
    settings = [*presets.SETTINGS.values(), presets.ENTITY_CROP]
    assert set(rows) == {s.name for s in settings}  # no setting missing, no stale row
    for setting in settings:
        assert f"`{setting.where}`" in rows[setting.name], (setting.name, setting.where)


# ----- sampling: sampler, negative prompt, beta per modality ----------------------------------------------------

def test_sample_preset_official_uses_plms_the_negative_prompt_and_the_modality_beta(tiny_pretrained, tmp_path,
                                                                                    monkeypatch):
    import json

    from gligen.evaluation import sample as sample_cli
    from gligen.sampling import sample

    module = GLIGENModule(tiny_pretrained, gamma_init=0.5)
    save_like_lightning(module, tmp_path / "m.ckpt")
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps({"prompt": "a red square", "objects": [{"box": [0.1, 0.1, 0.5, 0.5], "phrase": "x"}]}))
    calls = []
    monkeypatch.setattr(sample_cli, "sample", lambda *a, **kw: calls.append((a, kw)) or torch.zeros(1, 3, 16, 16))
    args = ["--ckpt", str(tmp_path / "m.ckpt"), "--layout", str(layout), "--steps", "10",
            "--out", str(tmp_path / "a.png")]
    sample_cli.main(args)
    sample_cli.main(args + ["--preset", "official"])
    sample_cli.main(args + ["--preset", "official", "--sampler", "ddim", "--tau", "1"])
    (paper, paper_kw), (official, official_kw), (mixed, mixed_kw) = calls
    # sample(ldm, prompts, grounding, betas, sampler, ...)
    assert (paper[4], paper_kw["negative_prompt"]) == ("ddim", "")
    assert (official[4], official_kw["negative_prompt"]) == ("plms", presets.OFFICIAL_NEGATIVE_PROMPT)
    assert paper[3] == official[3] == [1.0] * 3 + [0.0] * 7  # box: [0.3, 0, 0.7] in both
    assert (mixed[4], mixed[3], mixed_kw["negative_prompt"]) == ("ddim", [1.0] * 10, presets.OFFICIAL_NEGATIVE_PROMPT)

    # the negative prompt reaches the unconditional branch: another image with guidance, none without it
    ldm = module.ldm
    grounding = module.modality.layout_inputs(ldm, [{"objects": [{"box": [0.1, 0.1, 0.5, 0.5], "phrase": "x"}]}],
                                              module.hparams.max_objects)
    plain = sample(ldm, ["a red square"], grounding, steps=3, guidance=5.0, seeds=0)
    negative = sample(ldm, ["a red square"], grounding, steps=3, guidance=5.0, seeds=0, negative_prompt="blurry")
    assert not torch.allclose(plain, negative)
    assert torch.equal(sample(ldm, ["a"], grounding, steps=3, guidance=1.0, seeds=0),
                       sample(ldm, ["a"], grounding, steps=3, guidance=1.0, seeds=0, negative_prompt="blurry"))


def test_a_run_saved_before_presets_resumes_with_the_same_settings():
    from gligen.training.rundir import config_differences

    before = {"model": {"modality": "box", "caption_dropout": 0.1, "grounding_dropout_mode": "per_sample"},
              "data": {"class_path": "gligen.data.datamodule.GroundingDataModule", "init_args": {"resolution": 16}}}
    now = {"model": {"modality": "box", "caption_dropout": None, "grounding_dropout_mode": None, "preset": "paper"},
           "data": {"class_path": "gligen.data.datamodule.GroundingDataModule",
                    "init_args": {"resolution": 16, "detection_captions": None, "keypoint_slots": None,
                                  "keypoint_captions": None}}}
    assert config_differences(presets.with_preset_values(before), presets.with_preset_values(now)) == []
    official = {**now, "model": {**now["model"], "preset": "official"}}
    diffs = config_differences(presets.with_preset_values(before), presets.with_preset_values(official))
    assert [key for key, _, _ in diffs] == ["data.init_args.detection_captions", "data.init_args.keypoint_captions",
                                            "data.init_args.keypoint_slots", "model.caption_dropout",
                                            "model.grounding_dropout_mode", "model.preset"]
