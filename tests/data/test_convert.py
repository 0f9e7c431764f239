"""Converters: small real-format fixtures (COCO, COCO keypoints, MDETR, official TSV) round-tripped through shards."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from gligen.data.convert import ConvertError, normalise_xywh, phrase_from_spans
from gligen.data.convert.coco import convert_coco
from gligen.data.convert.keypoints import convert_keypoints
from gligen.data.convert.mdetr import convert_mdetr
from gligen.data.convert.official_tsv import convert_official_tsv
from gligen.data.decode import SkipCounter
from gligen.data.shards import iter_samples, resolve_shards

TOL = 1e-6
WRITE = {"max_samples": 2, "progress": False}


def _image_bytes(width, height, fmt, seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _write_image(path, width, height, fmt, seed=0):
    data = _image_bytes(width, height, fmt, seed)
    path.write_bytes(data)
    return data


def _read(out_dir):
    skips = SkipCounter(strict=True)  # everything written must read back cleanly
    return {s.key: s for s in iter_samples(resolve_shards(str(out_dir)), skips)}


def _xyxy(bbox, w, h):
    x, y, bw, bh = bbox
    return [x / w, y / h, (x + bw) / w, (y + bh) / h]


def _assert_boxes(sample, expected):
    got = np.array([o.box for o in sample.annotation.objects])
    np.testing.assert_allclose(got, np.array(expected).reshape(-1, 4), atol=TOL, rtol=0)


# ---------------------------------------------------------------------------------------------------- helpers
def test_normalise_xywh_converts_clips_and_rejects():
    assert normalise_xywh([10, 5, 20, 10], 40, 20) == (0.25, 0.25, 0.75, 0.75)
    assert normalise_xywh([-1, 0, 41, 20], 40, 20) == (0.0, 0.0, 1.0, 1.0)  # rounding overshoot clipped
    for bbox, reason in (([1, 2, 3], "bad_bbox"), ([0, 0, -1, 2], "bad_bbox"), ([0, 0, float("nan"), 2], "bad_bbox"),
                         ([0, 0, 0, 5], "zero_area_box"), ([50, 0, 5, 5], "box_outside_image"),
                         ("0 0 1 1", "bad_bbox")):
        with pytest.raises(ConvertError) as info:
            normalise_xywh(bbox, 40, 20)
        assert info.value.reason == reason, bbox


def test_phrase_from_spans_joins_and_validates():
    caption = "a brown dog next to a red ball"
    assert phrase_from_spans(caption, [[2, 11]]) == "brown dog"
    assert phrase_from_spans(caption, [[0, 1], [8, 11]]) == "a dog"
    for spans in ([], [[5, 2]], [[0, 99]], [["0", 3]], None):
        with pytest.raises(ConvertError):
            phrase_from_spans(caption, spans)


# ------------------------------------------------------------------------------------------------------- COCO
@pytest.fixture()
def coco(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    _write_image(images / "a.png", 40, 20, "PNG", 1)
    _write_image(images / "b.jpg", 30, 30, "JPEG", 2)
    _write_image(images / "d.png", 12, 12, "PNG", 4)  # declared 10x10 in the JSON: size mismatch
    (images / "e.png").write_bytes(b"\x89PNG truncated")  # corrupt file
    instances = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 40, "height": 20},
            {"id": 2, "file_name": "b.jpg", "width": 30, "height": 30},
            {"id": 3, "file_name": "c.png", "width": 10, "height": 10},  # missing file
            {"id": 4, "file_name": "d.png", "width": 10, "height": 10},
            {"id": 5, "file_name": "e.png", "width": 10, "height": 10},
            {"id": 6, "file_name": "f.png"},  # no size: bad entry
        ],
        "categories": [{"id": 1, "name": "dog"}, {"id": 7, "name": "traffic light"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [4.5, 2, 10, 8.25], "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 7, "bbox": [20, 0, 20, 20], "iscrowd": 0},
            {"id": 12, "image_id": 1, "category_id": 1, "bbox": [0, 0, 40, 20], "iscrowd": 1},
            {"id": 13, "image_id": 1, "category_id": 1, "bbox": [3, 3, 0, 4], "iscrowd": 0},
            {"id": 14, "image_id": 2, "category_id": 7, "bbox": [1, 2, 3], "iscrowd": 0},
            {"id": 15, "image_id": 2, "category_id": 1, "bbox": [0, 0, 15, 30], "iscrowd": 0},
            {"id": 16, "image_id": 2, "category_id": 99, "bbox": [0, 0, 5, 5], "iscrowd": 0},
            {"id": 17, "image_id": 3, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 0},
            {"id": 18, "image_id": 4, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 0},
            {"id": 19, "image_id": 5, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 0},
            {"id": 20, "image_id": 42, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 0},
        ],
    }
    captions = {"images": instances["images"], "annotations": [
        {"id": 100, "image_id": 1, "caption": "A dog by a traffic light."},
        {"id": 101, "image_id": 1, "caption": "A small dog outdoors."},
        {"id": 102, "image_id": 2, "caption": "A dog."},
    ]}
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    return tmp_path


def test_coco_detection_round_trip_and_problem_report(coco):
    index, report = convert_coco(str(coco / "instances.json"), str(coco / "images"), str(coco / "out"), **WRITE)
    assert index["total"] == 2 and index["kinds"] == {"detection": 2}
    samples = _read(coco / "out")
    assert sorted(samples) == ["coco-1", "coco-2"]
    a, b = samples["coco-1"], samples["coco-2"]
    assert a.caption == "" and a.annotation.kind == "detection"
    assert (a.annotation.width, a.annotation.height) == (40, 20)
    assert [o.phrase for o in a.annotation.objects] == ["dog", "traffic light"]
    assert [o.category for o in a.annotation.objects] == ["dog", "traffic light"]
    _assert_boxes(a, [_xyxy([4.5, 2, 10, 8.25], 40, 20), _xyxy([20, 0, 20, 20], 40, 20)])
    _assert_boxes(b, [_xyxy([0, 0, 15, 30], 30, 30)])
    assert b.image.size == (30, 30)
    # every problem is counted under its reason and named by file / annotation id
    assert report.dropped == {"crowd": 1, "zero_area_box": 1, "bad_bbox": 1, "unknown_category": 1,
                              "unknown_image_id": 1}
    assert report.skipped == {"missing_image": 1, "image_size_mismatch": 1, "bad_image": 1, "bad_image_entry": 1}
    assert "c.png" in report.examples["missing_image"][0]
    assert "annotation id 14" in report.examples["bad_bbox"][0]
    assert "images[5]" in report.examples["bad_image_entry"][0]
    saved = json.loads((coco / "out" / "convert_report.json").read_text())
    assert saved["written"] == 2 and saved["skipped_samples"]["missing_image"] == 1


def test_coco_keep_crowd_keeps_the_crowd_box(coco):
    convert_coco(str(coco / "instances.json"), str(coco / "images"), str(coco / "out"), keep_crowd=True, **WRITE)
    assert len(_read(coco / "out")["coco-1"].annotation.objects) == 3


def test_coco_captions_one_per_image_is_deterministic(coco):
    args = (str(coco / "instances.json"), str(coco / "images"))
    convert_coco(*args, str(coco / "o1"), captions=str(coco / "captions.json"), **WRITE)
    convert_coco(*args, str(coco / "o2"), captions=str(coco / "captions.json"), **WRITE)
    first, second = _read(coco / "o1"), _read(coco / "o2")
    assert sorted(first) == ["coco-1", "coco-2"]
    assert {k: s.caption for k, s in first.items()} == {k: s.caption for k, s in second.items()}
    assert first["coco-1"].caption in ("A dog by a traffic light.", "A small dog outdoors.")
    assert first["coco-2"].caption == "A dog." and first["coco-2"].annotation.kind == "detection_caption"
    assert [o.phrase for o in first["coco-1"].annotation.objects] == ["dog", "traffic light"]


def test_coco_per_caption_writes_one_sample_per_caption(coco):
    index, _ = convert_coco(str(coco / "instances.json"), str(coco / "images"), str(coco / "out"),
                            captions=str(coco / "captions.json"), per_caption=True, **WRITE)
    samples = _read(coco / "out")
    assert index["kinds"] == {"detection_caption": 3}
    assert {k: s.caption for k, s in samples.items()} == {
        "coco-1-c0": "A dog by a traffic light.", "coco-1-c1": "A small dog outdoors.", "coco-2": "A dog."}
    _assert_boxes(samples["coco-1-c1"], [_xyxy([4.5, 2, 10, 8.25], 40, 20), _xyxy([20, 0, 20, 20], 40, 20)])


def test_coco_unreadable_instances_file_is_fatal_and_named(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        convert_coco(str(tmp_path / "bad.json"), str(tmp_path), str(tmp_path / "out"), **WRITE)


# -------------------------------------------------------------------------------------------------- keypoints
def _kp_flat(points):
    return [c for p in points for c in p]


def test_keypoints_round_trip(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    _write_image(images / "p.jpg", 50, 40, "JPEG")
    kps = [[5 + k, 4 + k, 2 if k % 3 else 1] for k in range(17)]
    kps[16] = [0, 0, 0]
    hidden = [[0, 0, 0]] * 17
    data = {
        "images": [{"id": 7, "file_name": "p.jpg", "width": 50, "height": 40}],
        "categories": [{"id": 1, "name": "person"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "bbox": [2, 3, 30, 35], "iscrowd": 0,
             "keypoints": _kp_flat(kps), "num_keypoints": 16},
            {"id": 2, "image_id": 7, "category_id": 1, "bbox": [30, 10, 10, 10], "iscrowd": 0,
             "keypoints": _kp_flat(hidden), "num_keypoints": 0},  # box kept, no person entry
            {"id": 3, "image_id": 7, "category_id": 1, "bbox": [30, 10, 10, 10], "iscrowd": 0,
             "keypoints": [1, 2, 3], "num_keypoints": 1},  # malformed keypoints: person dropped, box kept
        ],
    }
    (tmp_path / "kp.json").write_text(json.dumps(data))
    _, report = convert_keypoints(str(tmp_path / "kp.json"), str(images), str(tmp_path / "out"), **WRITE)
    sample = _read(tmp_path / "out")["cocokp-7"]
    assert sample.annotation.kind == "detection" and sample.caption == ""
    assert [o.phrase for o in sample.annotation.objects] == ["person"] * 3
    _assert_boxes(sample, [_xyxy([2, 3, 30, 35], 50, 40)] + [_xyxy([30, 10, 10, 10], 50, 40)] * 2)
    assert len(sample.annotation.persons) == 1
    expected = np.array([[x / 50, y / 40, v] if v else [0, 0, 0] for x, y, v in kps])
    np.testing.assert_allclose(sample.annotation.persons[0].keypoints, expected, atol=TOL, rtol=0)
    assert report.dropped == {"bad_keypoints": 1}


# ------------------------------------------------------------------------------------------------------ MDETR
def test_mdetr_phrases_come_from_caption_spans(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    _write_image(images / "f.jpg", 32, 24, "JPEG")
    caption = "A man in a red hat holds a small dog ."
    data = {
        "images": [{"id": 0, "file_name": "f.jpg", "width": 32, "height": 24, "caption": caption,
                    "original_img_id": 123, "tokens_negative": []},
                   {"id": 1, "file_name": "f.jpg", "width": 32, "height": 24, "caption": ""}],
        "categories": [{"id": 1, "name": "object"}],
        "annotations": [
            {"id": 0, "image_id": 0, "category_id": 1, "bbox": [1, 1, 10, 20], "iscrowd": 0,
             "tokens_positive": [[0, 5]]},
            {"id": 1, "image_id": 0, "category_id": 1, "bbox": [2, 0, 6, 4], "iscrowd": 0,
             "tokens_positive": [[11, 18]]},
            {"id": 2, "image_id": 0, "category_id": 1, "bbox": [16, 8, 12, 12], "iscrowd": 0,
             "tokens_positive": [[25, 26], [33, 36]]},  # disjoint spans: "a dog"
            {"id": 3, "image_id": 0, "category_id": 1, "bbox": [16, 8, 12, 12], "iscrowd": 0,
             "tokens_positive": [[30, 99]]},  # out of the caption
        ],
    }
    (tmp_path / "mdetr.json").write_text(json.dumps(data))
    index, report = convert_mdetr(str(tmp_path / "mdetr.json"), str(images), str(tmp_path / "out"), **WRITE)
    samples = _read(tmp_path / "out")
    assert list(samples) == ["mdetr-0"] and index["kinds"] == {"grounding": 1}
    s = samples["mdetr-0"]
    assert s.caption == caption
    assert [o.phrase for o in s.annotation.objects] == ["A man", "red hat", "a dog"]
    _assert_boxes(s, [_xyxy([1, 1, 10, 20], 32, 24), _xyxy([2, 0, 6, 4], 32, 24), _xyxy([16, 8, 12, 12], 32, 24)])
    assert report.dropped == {"bad_tokens_positive": 1}
    assert report.skipped == {"no_caption": 1}
    assert "annotation id 3" in report.examples["bad_tokens_positive"][0]


# ----------------------------------------------------------------------------------------------- official TSV
def _tsv_row(row_id, item):
    return f"{row_id}\t{json.dumps(item)}\n"


def test_official_tsv_round_trip_and_bad_rows(tmp_path):
    img = base64.b64encode(_image_bytes(20, 16, "JPEG")).decode()
    caption = "a cat on a sofa"
    grounding = {"data_id": "g1", "image": img, "caption": caption, "annos": [
        {"bbox": [2, 2, 8, 8], "tokens_positive": [[0, 5]], "text_embedding_before": "AAAA"},
        {"bbox": [0, 8, 20, 8], "tokens_positive": [[9, 15]]},
        {"bbox": [0, 0, 0, 3], "tokens_positive": [[9, 15]]},  # zero area
    ]}
    detection = {"data_id": "d1", "image": img, "is_det": True, "annos": [
        {"bbox": [1, 1, 4, 4], "category_name": "chair"}, {"bbox": [5, 5, 4, 4], "text": "lamp"},
        {"bbox": [5, 5, 4, 4]},  # no phrase at all
    ]}
    lines = [
        _tsv_row(0, grounding),
        _tsv_row(1, detection),
        "2\t{this is not json\n",
        _tsv_row(3, dict(grounding, data_id="g2", image="***not base64***")),
        _tsv_row(4, dict(grounding, data_id="g3", image=base64.b64encode(b"not an image").decode())),
        "5 no tab at all\n",
        _tsv_row(6, [1, 2, 3]),
    ]
    (tmp_path / "data.tsv").write_text("".join(lines))
    _, report = convert_official_tsv([str(tmp_path / "data.tsv")], str(tmp_path / "out"), **WRITE)
    samples = _read(tmp_path / "out")
    assert sorted(samples) == ["tsv-d1", "tsv-g1"]
    g, d = samples["tsv-g1"], samples["tsv-d1"]
    assert g.annotation.kind == "grounding" and g.caption == caption
    assert [o.phrase for o in g.annotation.objects] == ["a cat", "a sofa"]
    _assert_boxes(g, [_xyxy([2, 2, 8, 8], 20, 16), _xyxy([0, 8, 20, 8], 20, 16)])
    assert d.annotation.kind == "detection" and d.caption == ""
    assert [o.phrase for o in d.annotation.objects] == ["chair", "lamp"]
    assert d.annotation.objects[0].category == "chair"
    assert report.skipped == {"bad_json_row": 2, "bad_base64": 1, "bad_image": 1, "bad_tsv_row": 1}
    assert report.dropped == {"zero_area_box": 1, "no_phrase": 1}
    named = " ".join(e for es in report.examples.values() for e in es)
    for row in (3, 4, 5, 6, 7):  # 1-based line numbers of the bad rows
        assert f"data.tsv row {row}" in named
