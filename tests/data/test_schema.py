import copy

import numpy as np
import pytest

from gligen.data.examples import annotation
from gligen.data.schema import SchemaError, member_category, validate_annotation

KPS = [[0.5, 0.5, 2]] * 17


def valid() -> dict:
    return annotation("grounding", boxes=[(0.1, 0.2, 0.6, 0.9), (0.0, 0.0, 1.0, 1.0)], phrases=["a dog", "a sky"],
                      width=640, height=480, persons=[KPS])


def test_valid_annotation_parses_and_round_trips():
    obj = valid()
    ann = validate_annotation(obj, "shard-0.tar:k0")
    assert ann.kind == "grounding" and (ann.width, ann.height) == (640, 480)
    assert [o.box for o in ann.objects] == [(0.1, 0.2, 0.6, 0.9), (0.0, 0.0, 1.0, 1.0)]
    assert [o.phrase for o in ann.objects] == ["a dog", "a sky"]
    assert ann.persons[0].keypoints.shape == (17, 3)
    assert ann.to_json() == obj


def test_persons_absent_is_none_not_empty():
    obj = valid()
    del obj["persons"]
    assert validate_annotation(obj, "k").persons is None
    obj["persons"] = []
    assert validate_annotation(obj, "k").persons == ()


def _set(path, value):
    def mutate(obj):
        target = obj
        for p in path[:-1]:
            target = target[p]
        target[path[-1]] = value
    return mutate


def _delete(name):
    def mutate(obj):
        del obj[name]
    return mutate


CASES = [
    ("box_nan", "objects[0].box", _set(["objects", 0, "box"], [0.1, float("nan"), 0.5, 0.5])),
    ("box_nan", "objects[1].box", _set(["objects", 1, "box"], [0.1, 0.1, float("inf"), 0.5])),
    ("box_inverted", "objects[0].box", _set(["objects", 0, "box"], [0.6, 0.2, 0.1, 0.9])),
    ("box_inverted", "objects[0].box", _set(["objects", 0, "box"], [0.1, 0.9, 0.6, 0.2])),
    ("box_zero_area", "objects[0].box", _set(["objects", 0, "box"], [0.3, 0.2, 0.3, 0.9])),
    ("box_out_of_range", "objects[0].box", _set(["objects", 0, "box"], [0.1, 0.2, 1.5, 0.9])),
    ("box_out_of_range", "objects[0].box", _set(["objects", 0, "box"], [-0.1, 0.2, 0.5, 0.9])),
    ("bad_box", "objects[0].box", _set(["objects", 0, "box"], [0.1, 0.2, 0.5])),
    ("bad_box", "objects[0].box", _set(["objects", 0, "box"], [0.1, 0.2, "0.5", 0.9])),
    ("bad_phrase", "objects[1].phrase", _set(["objects", 1, "phrase"], "  ")),
    ("bad_field", "objects[0].category", _set(["objects", 0, "category"], 3)),
    ("bad_field", "objects[0].entity_image", _set(["objects", 0, "entity_image"], "../etc/passwd")),
    ("bad_keypoint_count", "persons[0].keypoints", _set(["persons", 0, "keypoints"], KPS[:16])),
    ("bad_keypoint", "persons[0].keypoints[3]", _set(["persons", 0, "keypoints", 3], [0.5, 0.5, 3])),
    ("keypoint_out_of_range", "persons[0].keypoints[0]", _set(["persons", 0, "keypoints", 0], [1.2, 0.5, 2])),
    ("schema_version", "schema_version", _set(["schema_version"], 2)),
    ("schema_version", "schema_version", _delete("schema_version")),
    ("bad_kind", "kind", _set(["kind"], "segmentation")),
    ("bad_field", "width", _set(["width"], 0)),
    ("bad_field", "height", _set(["height"], 4.5)),
    ("bad_field", "source_id", _delete("source_id")),
    ("bad_field", "objects", _delete("objects")),
]


@pytest.mark.parametrize("reason,field,mutate", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_invalid_annotation_reason_and_field(reason, field, mutate):
    obj = copy.deepcopy(valid())
    mutate(obj)
    with pytest.raises(SchemaError) as info:
        validate_annotation(obj, "shard-000003.tar:key42")
    assert info.value.reason == reason
    assert info.value.field == field
    assert isinstance(info.value, ValueError)
    assert "shard-000003.tar:key42" in str(info.value) and field in str(info.value)


def test_unlabelled_keypoint_may_lie_outside():
    obj = valid()
    obj["persons"][0]["keypoints"][0] = [0.0, -5.0, 0]  # COCO writes unlabelled points as (0, 0, 0); any finite ok
    assert validate_annotation(obj, "k").persons[0].keypoints[0, 2] == 0


def test_non_object_json_is_bad_json():
    with pytest.raises(SchemaError) as info:
        validate_annotation([1, 2], "k")
    assert info.value.reason == "bad_json"


@pytest.mark.parametrize("member,category", [
    ("jpg", "image"), ("png", "image"), ("webp", "image"), ("txt", "caption"), ("json", "annotation"),
    ("latent_mean.npy", "array"), ("latent_std_flip.npy", "array"), ("caption_embeds.npy", "array"),
    ("phrase_embeds.npy", "array"), ("entity_embeds.npy", "array"), ("entity0.png", "entity_image"),
    ("entity12.jpg", "entity_image"),
])
def test_member_categories(member, category):
    assert member_category(member) == category


@pytest.mark.parametrize("member,reason", [
    ("pyd", "pickle_member"), ("pickle", "pickle_member"), ("extra.pyd", "pickle_member"), ("PKL", "pickle_member"),
    ("pth", "pickle_member"), ("xyz", "unknown_member"), ("cls", "unknown_member"), ("other.npy", "unknown_member"),
    ("jpeg", "unknown_member"), ("entity.png", "unknown_member"), ("", "unknown_member"),
])
def test_members_outside_schema_refused(member, reason):
    with pytest.raises(SchemaError) as info:
        member_category(member, "shard.tar:k")
    assert info.value.reason == reason and "shard.tar:k" in str(info.value)


def test_keypoints_are_float32_array():
    kps = validate_annotation(valid(), "k").persons[0].keypoints
    assert kps.dtype == np.float32 and np.array_equal(kps, np.asarray(KPS, np.float32))
