import io
import itertools

import numpy as np
import pytest
from PIL import Image

from gligen.toy import world
from gligen.toy.world import make_sample


def decode(png: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(png)).convert("RGB"))


def test_vocabulary_is_large_enough_and_colours_are_far_apart():
    assert len(world.SHAPES) >= 4 and len(world.COLOURS) >= 6
    assert len(world.CATEGORIES) == len(set(world.CATEGORIES)) == len(world.SHAPES) * len(world.COLOURS)
    colours = [np.array(c) for c in world.PALETTE.values()] + [np.zeros(3)]  # black background included
    assert min(np.linalg.norm(a - b) for a, b in itertools.combinations(colours, 2)) >= 250
    joints = [np.array(c) for c in world.KEYPOINT_COLOURS] + [np.zeros(3), np.array(world.LIMB_COLOUR)]
    assert len(world.KEYPOINT_COLOURS) == 17
    assert min(np.linalg.norm(a - b) for a, b in itertools.combinations(joints, 2)) >= 127


@pytest.mark.parametrize("shape", world.SHAPES)
def test_every_shape_touches_all_sides_of_its_box_and_is_its_own_best_match(shape):
    # The exactness of annotated boxes and of shape read-back rests on these two facts, at every size drawn.
    for h, w in itertools.product(range(3, 41, 3), range(3, 41, 4)):
        mask = world.shape_mask(shape, h, w)
        assert world.tight_box(mask) == (0, 0, w, h), (shape, h, w)
        if max(h, w) <= world.MAX_ASPECT * min(h, w) and min(h, w) >= 6:
            assert world.match_shape(mask) == (shape, 1.0), (shape, h, w)


def test_shapes_are_pairwise_distinguishable():
    for n in (8, 12, 19):
        masks = {s: world.shape_mask(s, n, n) for s in world.SHAPES}
        for a, b in itertools.combinations(world.SHAPES, 2):
            assert world.mask_iou(masks[a], masks[b]) < 0.85, (a, b, n)


def test_generation_is_deterministic_for_a_seed():
    a = make_sample("train", 7, seed=3)
    b = make_sample("train", 7, seed=3)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    assert make_sample("train", 8, seed=3)["png"] != a["png"]
    assert make_sample("train", 7, seed=4)["png"] != a["png"]
    assert make_sample("val", 7, seed=3)["png"] != a["png"]
    p, q = make_sample("test", 2, family="persons"), make_sample("test", 2, family="persons")
    assert p["png"] == q["png"] and p["json"] == q["json"]


@pytest.mark.parametrize("kind", world.KINDS)
def test_samples_follow_the_schema(kind):
    from gligen.data.schema import member_category, validate_annotation

    for i in range(5):
        sample = make_sample("train", i, kind=kind)
        annotation = validate_annotation(sample["json"], sample["__key__"])
        assert annotation.kind == kind and annotation.width == annotation.height == 32
        assert sample["json"]["source_id"] == sample["__key__"] and "." not in sample["__key__"]
        for member in sample:
            if member != "__key__":
                member_category(member)  # raises on anything outside schema v1
        assert decode(sample["png"]).shape == (32, 32, 3)
        assert 1 <= len(annotation.objects) <= world.MAX_OBJECTS


def test_captions_and_phrases_per_kind():
    grounding = make_sample("train", 1, kind="grounding")
    for obj in grounding["json"]["objects"]:
        assert obj["phrase"] == f"a {obj['category']}" and obj["phrase"] in grounding["txt"]
    detection = make_sample("train", 1, kind="detection")
    assert detection["txt"] == ""
    assert all(o["phrase"] == o["category"] for o in detection["json"]["objects"])
    both = make_sample("train", 1, kind="detection_caption")
    assert all(o["phrase"] == o["category"] and o["category"] in both["txt"] for o in both["json"]["objects"])
    templates = set()
    for i in range(40):
        sample = make_sample("train", i, with_entities=False)
        named = world.join_phrases([o["phrase"] for o in sample["json"]["objects"]])
        assert named in sample["txt"]  # the caption names every object, in order
        templates.add(sample["txt"].replace(named, "{}"))
    assert templates <= set(world.CAPTION_TEMPLATES) and len(templates) >= 3


def test_annotated_boxes_are_the_drawn_pixels():
    # Independent of the evaluator: the annotated box must hold the object's colour on its four border lines
    # (the shape touches every side) and the box size must respect the world's side range.
    for i in range(30):
        sample = make_sample("val", i)
        image, res = decode(sample["png"]), sample["json"]["width"]
        for obj in sample["json"]["objects"]:
            x0, y0, x1, y1 = (round(c * res) for c in obj["box"])
            low, high = world.MIN_OBJECT_SIDE * res - 1, world.MAX_OBJECT_SIDE * res + 1
            assert low <= x1 - x0 <= high and low <= y1 - y0 <= high
            colour = np.array(world.PALETTE[obj["category"].split()[0]])
            inside = (image[y0:y1, x0:x1] == colour).all(axis=-1)
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()


def test_every_object_stays_mostly_visible():
    for i in range(40):
        scene, _ = world.make_scene("train", i)
        for k, obj in enumerate(scene.objects):
            full = obj.mask(scene.resolution)
            covered = np.zeros_like(full)
            for later in scene.objects[k + 1:]:
                covered |= later.mask(scene.resolution)
            assert (full & ~covered).sum() >= world.MIN_VISIBLE_FRACTION * full.sum()


def test_ood_pairs_never_appear_in_train_val_test_and_only_they_appear_in_ood():
    held_out = {f"{c} {s}" for c, s in world.HELD_OUT_PAIRS}
    assert len(held_out) == 4 and not held_out & {f"{c} {s}" for c, s in world.SEEN_PAIRS}
    for split in ("train", "val", "test"):
        seen = {o["category"] for i in range(60) for o in make_sample(split, i, with_entities=False)["json"]["objects"]}
        assert not seen & held_out, split
    ood = {o["category"] for i in range(40) for o in make_sample("ood", i, with_entities=False)["json"]["objects"]}
    assert ood == held_out


def test_entity_images_show_the_same_object_alone():
    sample = make_sample("train", 3, kind="grounding")
    objects = sample["json"]["objects"]
    assert [o["entity_image"] for o in objects] == [f"entity{i}.png" for i in range(len(objects))]
    for i, obj in enumerate(objects):
        entity = decode(sample[f"entity{i}.png"])
        colour = world.PALETTE[obj["category"].split()[0]]
        drawn = (entity != 0).any(axis=-1)
        assert drawn.any() and (entity[drawn] == colour).all()  # one colour only, on black
        x0, y0, x1, y1 = world.tight_box(drawn)
        assert world.match_shape(drawn[y0:y1, x0:x1])[0] == obj["category"].split()[1]
    bare = make_sample("train", 3, with_entities=False)
    assert not any(k.startswith("entity") for k in bare)
    assert all(o["entity_image"] is None for o in bare["json"]["objects"])


@pytest.mark.parametrize("resolution", [32, 64])
def test_resolution_is_a_parameter(resolution):
    sample = make_sample("test", 0, resolution=resolution)
    assert decode(sample["png"]).shape == (resolution, resolution, 3)
    assert sample["json"]["width"] == resolution


def test_background_texture_is_light_and_optional():
    plain = decode(make_sample("train", 0)["png"])
    textured = decode(make_sample("train", 0, background_texture=30)["png"])
    background = (plain == 0).all(axis=-1)
    assert textured[background].max() > 0 and textured[background].max() <= 30
    assert (textured[~background] == plain[~background]).all()


@pytest.mark.parametrize("resolution", [None, 64])
def test_person_scenes_carry_17_exact_keypoints(resolution):
    from gligen.data.schema import validate_annotation

    for i in range(20):
        sample = make_sample("train", i, family="persons", resolution=resolution)
        annotation = validate_annotation(sample["json"], sample["__key__"])
        image, res = decode(sample["png"]), sample["json"]["width"]
        assert res == (resolution or world.DEFAULT_RESOLUTION) and annotation.objects == ()
        assert len(annotation.persons) == 1
        # joints are whole blobs, 3 px at 32 (1-px joints do not survive the toy VAE), scaled with resolution
        blob = 3 * res // 32
        for colour in world.KEYPOINT_COLOURS:
            assert (image == colour).all(axis=-1).sum() == blob * blob, (i, colour)
        for person in annotation.persons:
            assert person.keypoints.shape == (17, 3) and (person.keypoints[:, 2] == 2).all()
            for k, (x, y, _) in enumerate(person.keypoints):
                # The blob centre lies on a pixel corner (even blob) or centre (odd): the pixel just up-left of it
                # and the one at it both belong to the blob.
                for px, py in ((x * res, y * res), (x * res - 0.5, y * res - 0.5)):
                    assert tuple(image[int(py), int(px)]) == world.KEYPOINT_COLOURS[k], (i, k)


@pytest.mark.parametrize("family", world.FAMILIES)
def test_write_split_round_trips_through_the_data_layer(tmp_path, family):
    from gligen.data.decode import SkipCounter
    from gligen.data.shards import iter_samples, resolve_shards

    index = world.write_split("val", "detection_caption", 5, str(tmp_path), family=family, max_samples=2)
    assert index["total"] == 5 and len(index["shards"]) == 3
    skips = SkipCounter(strict=True)
    read = list(iter_samples(resolve_shards(str(tmp_path)), skips))
    assert [s.key for s in read] == [make_sample("val", i, "detection_caption", family)["__key__"] for i in range(5)]
    first = make_sample("val", 0, "detection_caption", family)
    assert (np.array(read[0].image) == decode(first["png"])).all() and read[0].caption == first["txt"]
    assert len(read[0].entity_images) == (0 if family == "persons" else len(first["json"]["objects"]))
    assert skips.summary() == {}


# ----- the styled family: background patterns named in the caption (only the base's pretraining data has them) ----

def test_styled_scenes_draw_the_style_their_caption_names():
    seen = set()
    for index in range(30):
        sample = world.make_sample("train", index, family="styled", with_entities=False)
        scene, _ = world.make_scene("train", index, family="styled")
        style = world.caption_style(sample["txt"])
        assert style == scene.style and sample["txt"].endswith(f"on a {style} background")
        image = np.array(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
        background = ~np.any([obj.mask(32) for obj in scene.objects], axis=0)
        grey = image[..., 0] == world.STYLE_GREY
        assert np.array_equal(grey[background], world.style_mask(style, 32)[background])
        seen.add(style)
    assert seen == set(world.STYLES)
    # the other families are untouched: same pixels and captions as before the styled family existed
    plain = world.make_sample("train", 3, with_entities=False)
    assert world.caption_style(plain["txt"]) is None
    assert not (np.array(Image.open(io.BytesIO(plain["png"])).convert("RGB")) == world.STYLE_GREY).any()


def test_style_patterns_are_told_apart():
    """Each pattern correlates with no other at any phase beyond R^2 0.34 (striped vs dotted), so the best fit names
    the style."""
    for a in world.STYLES:
        for b in world.STYLES:
            if a == b:
                continue
            mask_a = world.style_mask(a, 32).ravel().astype(float)
            best = max(np.corrcoef(mask_a, world.style_mask(b, 32, (dx, dy)).ravel())[0, 1] ** 2
                       for dx in range(world.style_period(32)) for dy in range(world.style_period(32)))
            assert best < 0.34, (a, b, best)
