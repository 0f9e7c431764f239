"""Layout records (gligen.metrics.resample): on the full layout set they give back the metric the sweep reports
(torchmetrics / pycocotools AP, mIoU, PCK), a weight of k counts an image k times (as if it were repeated), and they
survive their JSON form."""

import json

import numpy as np
import pytest

from gligen.metrics.grounding import ap_records, grounding_ap, miou, miou_records
from gligen.metrics.keypoints import keypoint_ap_records, keypoint_average_precision, pck, pck_counts
from gligen.metrics.resample import APRecords, MeanRecords, RowRecords

LABELS = ["red square", "blue disc", "green triangle", "red disc"]


def random_box(rng):
    x0, y0 = rng.uniform(0, 0.7, 2)
    w, h = rng.uniform(0.05, 0.3, 2)
    return [float(x0), float(y0), float(x0 + w), float(y0 + h)]


def random_scene(rng, n_images, jitter, score_digits=None):
    """Layouts and detections: most objects found near their box (some with the wrong label), plus strays."""
    layouts, detections = [], []
    for _ in range(n_images):
        objects = [{"box": random_box(rng), "category": LABELS[rng.integers(len(LABELS))], "phrase": "x"}
                   for _ in range(rng.integers(0, 4))]
        dets = []
        for obj in objects:
            if rng.random() < 0.8:
                box = np.array(obj["box"]) + rng.normal(0, jitter, 4)
                label = obj["category"] if rng.random() < 0.8 else LABELS[rng.integers(len(LABELS))]
                dets.append({"box": tuple(box.tolist()), "label": label, "score": float(rng.random())})
        dets += [{"box": tuple(random_box(rng)), "label": LABELS[rng.integers(len(LABELS))],
                  "score": float(rng.random())} for _ in range(rng.integers(0, 3))]
        if score_digits is not None:
            dets = [{**d, "score": round(d["score"], score_digits)} for d in dets]
        layouts.append({"objects": objects})
        detections.append(dets)
    return detections, layouts


@pytest.mark.parametrize("seed", range(6))
def test_ap_records_give_back_torchmetrics_ap_on_the_full_set(seed):
    rng = np.random.default_rng(seed)
    detections, layouts = random_scene(rng, int(rng.integers(5, 50)), jitter=0.01 * seed, score_digits=seed % 3 + 1)
    expected = grounding_ap(detections, layouts)
    found = ap_records(detections, layouts).values(np.ones((1, len(layouts))))
    for key, value in expected.items():  # torchmetrics returns float32
        assert found[key][0] == pytest.approx(value, abs=1e-6), key


@pytest.mark.parametrize("seed", range(4))
def test_a_weight_of_k_counts_an_image_k_times(seed):
    rng = np.random.default_rng(10 + seed)
    detections, layouts = random_scene(rng, 25, jitter=0.02)
    weights = rng.integers(0, 4, len(layouts))
    repeated_d = [d for d, k in zip(detections, weights) for _ in range(k)]
    repeated_l = [layout for layout, k in zip(layouts, weights) for _ in range(k)]
    expected = grounding_ap(repeated_d, repeated_l)
    found = ap_records(detections, layouts).values(weights[None])
    for key, value in expected.items():
        assert found[key][0] == pytest.approx(value, abs=1e-6), key
    assert miou_records(detections, layouts).values(weights[None])["mean"][0] == pytest.approx(
        miou(repeated_d, repeated_l))
    # many draws at once: each row is its own multiset
    many = ap_records(detections, layouts).values(np.stack([weights, np.ones_like(weights)]))
    assert many["ap"][0] == pytest.approx(expected["ap"], abs=1e-6)
    assert many["ap"][1] == pytest.approx(grounding_ap(detections, layouts)["ap"], abs=1e-6)


def random_persons(rng, n_images, noise):
    layouts, predicted, scores = [], [], []
    for _ in range(n_images):
        persons = []
        for _ in range(rng.integers(0, 3)):
            centre = rng.uniform(0.2, 0.8, 2)
            joints = np.concatenate([centre + rng.normal(0, 0.1, (17, 2)),
                                     np.where(rng.random((17, 1)) < 0.8, 2.0, 0.0)], 1)
            joints[0, 2] = 2.0
            persons.append(joints)
        layouts.append({"persons": [{"keypoints": p.tolist()} for p in persons], "width": 64, "height": 64})
        found = [np.concatenate([p[:, :2] + rng.normal(0, noise, (17, 2)), p[:, 2:]], 1)
                 for p in persons if rng.random() < 0.8]
        found += [np.concatenate([rng.uniform(0, 1, (17, 2)), np.full((17, 1), 2.0)], 1)
                  for _ in range(rng.integers(0, 2))]
        predicted.append(np.array(found).reshape(-1, 17, 3))
        scores.append(rng.random(len(found)))
    return predicted, scores, layouts


def test_keypoint_records_give_back_oks_ap_and_pck_and_count_repeats():
    rng = np.random.default_rng(3)
    predicted, scores, layouts = random_persons(rng, 20, noise=0.02)
    expected = keypoint_average_precision(predicted, scores, layouts)
    records = keypoint_ap_records(predicted, scores, layouts)
    for key, value in expected.items():
        assert records.values(np.ones((1, 20)))[key][0] == pytest.approx(value, abs=1e-12)
    weights = rng.integers(0, 3, 20)

    def rep(items):
        return [x for x, k in zip(items, weights) for _ in range(k)]

    repeated = keypoint_average_precision(rep(predicted), rep(scores), rep(layouts))
    assert records.values(weights[None])["ap"][0] == pytest.approx(repeated["ap"], abs=1e-12)
    correct, total = pck_counts(predicted, layouts)
    assert MeanRecords(correct, total).values(np.ones((1, 20)))["mean"][0] == pytest.approx(pck(predicted, layouts))
    # no detection at all: AP 0 in every resample, as the metric's
    empty = keypoint_ap_records([np.zeros((0, 17, 3))] * 20, [np.zeros(0)] * 20, layouts)
    assert not empty.values(rng.integers(0, 3, (5, 20))).get("ap").any()


def test_row_records_survive_json_and_name_their_content():
    rng = np.random.default_rng(4)
    detections, layouts = random_scene(rng, 12, jitter=0.02)
    records = RowRecords()
    records.add("ap", ap_records(detections, layouts), {"ap": "ap", "ap50": "ap50"})
    records.add("miou", miou_records(detections, layouts), {"miou": "mean"})
    records.alias("value", "ap50")
    loaded = RowRecords.from_json(json.loads(json.dumps(records.to_json())))
    weights = rng.integers(0, 3, (7, 12)).astype(float)
    for metric in ("ap", "ap50", "miou", "value"):
        assert np.array_equal(loaded.values(metric, weights), records.values(metric, weights))
    assert loaded.content_id() == records.content_id()
    row = {"ap": grounding_ap(detections, layouts)["ap"], "ap50": grounding_ap(detections, layouts)["ap50"],
           "miou": miou(detections, layouts)}
    assert records.mismatches({**row, "value": row["ap50"]}) == []
    assert records.mismatches({**row, "value": row["ap50"], "miou": row["miou"] + 0.01}) == ["miou"]
    records.drop("ap")
    assert set(records.metrics) == {"ap50", "miou", "value"} and "ap" in records.families  # ap50 still uses it


def test_ap_without_any_ground_truth_is_zero_like_the_reported_metric():
    records = APRecords([{"det": [[0, 0.9, 0, 1]], "gt": {}}], [0.5, 0.75], [0.0, 0.5, 1.0])
    assert records.values(np.ones((1, 1)))["ap"][0] == 0.0
    assert grounding_ap([[{"box": (0, 0, 1, 1), "label": "a", "score": 0.9}]], [{"objects": []}])["ap"] == 0.0
