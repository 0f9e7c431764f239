import io

import numpy as np
import pytest
import torch
from PIL import Image

from gligen.metrics.grounding import (
    box_grounding_metrics,
    coarse_grounding_metrics,
    grounding_ap,
    label_ids,
    miou,
    target_label,
)
from gligen.metrics.transformers_detector import TransformersDetector
from gligen.toy import evaluate, world
from gligen.toy.evaluate import ToyDetector


def decode(png: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(png)).convert("RGB"))


@pytest.fixture(scope="module")
def toy_set():
    samples = [world.make_sample("test", i, with_entities=False) for i in range(40)]
    return [decode(s["png"]) for s in samples], [s["json"] for s in samples]


def layout(*objects):
    """A schema layout from (box, phrase, category) triples."""
    return {"objects": [{"box": list(box), "phrase": phrase, "category": category}
                        for box, phrase, category in objects]}


def det(box, label, score=0.9):
    return {"box": tuple(box), "label": label, "score": score}


# ------------------------------------------------------------------------------------------------------- toy


def test_toy_detector_scores_near_perfect_on_real_toy_images(toy_set):
    images, layouts = toy_set
    detections = ToyDetector()(images)
    assert len(detections) == len(images)
    assert all(set(d) == {"box", "label", "score"} and d["label"] in world.CATEGORIES for dets in detections
               for d in dets)
    scores = grounding_ap(detections, layouts)
    print(f"\nToyDetector on real toy images: {scores}, miou {miou(detections, layouts):.3f}")
    assert scores["ap50"] >= 0.95 and scores["ap75"] >= 0.95 and scores["ap"] >= 0.9
    assert miou(detections, layouts) >= 0.95


def test_toy_detector_scores_near_zero_against_shuffled_layouts(toy_set):
    images, layouts = toy_set
    detections = ToyDetector()(images)
    shuffled = layouts[1:] + layouts[:1]
    assert grounding_ap(detections, shuffled)["ap50"] < 0.2
    assert miou(detections, shuffled) < 0.3


def coco_ap(detections, layouts, size=32):
    """AP / AP50 / AP75 straight from pycocotools' COCOeval on the same detections: an implementation independent
    of grounding_ap's label ids, box tensors and torchmetrics (pixel xywh boxes, one category per label string)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    labels = sorted({d["label"] for dets in detections for d in dets} | {o["category"] for lay in layouts
                                                                         for o in lay["objects"]})
    cat = {label: i + 1 for i, label in enumerate(labels)}

    def xywh(box):
        x0, y0, x1, y1 = (v * size for v in box)
        return [x0, y0, x1 - x0, y1 - y0]

    gts = [{"id": k + 1, "image_id": i, "category_id": cat[o["category"]], "bbox": xywh(o["box"]), "iscrowd": 0,
            "area": xywh(o["box"])[2] * xywh(o["box"])[3]}
           for k, (i, o) in enumerate((i, o) for i, lay in enumerate(layouts) for o in lay["objects"])]
    dts = [{"image_id": i, "category_id": cat[d["label"]], "bbox": xywh(d["box"]), "score": d["score"]}
           for i, dets in enumerate(detections) for d in dets]
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO()
        truth.dataset = {"images": [{"id": i} for i in range(len(layouts))], "annotations": gts,
                         "categories": [{"id": c, "name": n} for n, c in cat.items()]}
        truth.createIndex()
        evaluator = COCOeval(truth, truth.loadRes(dts), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return dict(zip(("ap", "ap50", "ap75"), (float(v) for v in evaluator.stats[:3])))


def test_grounding_ap_equals_an_independent_cocoeval_and_the_toy_miou(toy_set):
    images, layouts = toy_set
    images = [np.roll(im, 2, axis=1) for im in images]  # shifted: AP75 and mIoU below 1, so the match is informative
    toy = [evaluate.detect_objects(im) for im in images]
    # off the pixel grid: toy boxes give IoUs of exactly 0.75, 0.8, ..., where float32 (torchmetrics) and float64
    # (pycocotools on pixel boxes) may land on either side of an IoU threshold
    rng = np.random.default_rng(0)
    generic = [[det(tuple(float(np.clip(v + rng.uniform(-2e-3, 2e-3), 0, 1)) for v in d.box), d.category,
                    d.score + rng.uniform(0, 1e-4)) for d in dets] for dets in toy]  # no tied scores either
    expected = coco_ap(generic, layouts)
    assert 0 < expected["ap75"] < expected["ap50"] <= 1
    # torchmetrics (its pycocotools backend) and this direct COCOeval agree to ~5e-4 here, not to float precision
    # (cause not found: not box or score precision, not ties); a label or box mapping error moves AP by far more
    assert grounding_ap(generic, layouts) == pytest.approx(expected, abs=1e-3)
    exact = [[det(d.box, d.category, d.score) for d in dets] for dets in toy]
    assert miou(exact, layouts) == pytest.approx(evaluate.mean_best_iou(toy, layouts), abs=1e-9)


# ------------------------------------------------------------------------------------------- metric behaviour


BOX = (0.1, 0.1, 0.5, 0.5)


def test_right_box_with_wrong_label_scores_zero():
    layouts = [layout((BOX, "a red square", "red square"))]
    assert grounding_ap([[det(BOX, "red square")]], layouts)["ap50"] == pytest.approx(1.0)
    assert grounding_ap([[det(BOX, "blue square")]], layouts) == {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    assert miou([[det(BOX, "blue square")]], layouts) == 0.0
    assert miou([[det(BOX, "red square")]], layouts) == pytest.approx(1.0)


def test_coarse_metrics_score_placement_by_colour_only():
    layouts = [layout((BOX, "a red square", "red square"), ((0.6, 0.6, 0.9, 0.9), "a blue cross", "blue cross"))]
    # right colours in the right boxes, wrong shapes: placement is right, the class is not
    wrong_shapes = [[det(BOX, "red circle"), det((0.6, 0.6, 0.9, 0.9), "blue circle")]]
    assert grounding_ap(wrong_shapes, layouts)["ap50"] == 0.0
    coarse = coarse_grounding_metrics(wrong_shapes, layouts, ToyDetector.coarse_label)
    assert coarse == {"coarse_ap50": pytest.approx(1.0), "coarse_miou": pytest.approx(1.0)}
    # colours swapped between the boxes: misplaced, also coarsely
    swapped = [[det(BOX, "blue square"), det((0.6, 0.6, 0.9, 0.9), "red cross")]]
    assert coarse_grounding_metrics(swapped, layouts, ToyDetector.coarse_label)["coarse_ap50"] == 0.0


def test_box_grounding_metrics_adds_coarse_metrics_for_the_toy_detector(toy_set):
    images, layouts = toy_set
    metrics = box_grounding_metrics(images, layouts, ToyDetector())
    assert metrics["coarse_ap50"] >= metrics["ap50"] >= 0.95


def test_label_ids_are_shared_by_predictions_and_targets():
    # Predicted labels {b, c} and target labels {a, b} sort differently: ids built per side would swap classes.
    layouts = [layout((BOX, "b", None)), layout((BOX, "a", None))]
    detections = [[det(BOX, "b")], [det(BOX, "c")]]
    assert label_ids(detections, layouts) == {"a": 0, "b": 1, "c": 2}
    # class a: its one object is missed (AP 0); class b: found (AP 1); class c has no ground truth (ignored).
    assert grounding_ap(detections, layouts)["ap50"] == pytest.approx(0.5)
    assert miou(detections, layouts) == pytest.approx(0.5)


def test_iou_thresholds_separate_ap50_from_ap75():
    shifted = (0.1, 0.1, 0.5, 0.5 + 0.4 * 0.5)  # IoU with BOX = 0.4 / 0.6 = 0.667
    scores = grounding_ap([[det(shifted, "x")]], [layout((BOX, "x", None))])
    assert scores["ap50"] == pytest.approx(1.0) and scores["ap75"] == 0.0 and 0 < scores["ap"] < 0.5
    assert miou([[det(shifted, "x")]], [layout((BOX, "x", None))]) == pytest.approx(2 / 3)


def test_target_label_is_the_category_else_the_phrase():
    assert target_label({"box": BOX, "phrase": "a red square", "category": "red square"}) == "red square"
    assert target_label({"box": BOX, "phrase": "a red square", "category": None}) == "a red square"
    layouts = [layout((BOX, "a red square", "red square"))]
    detections = [[det(BOX, "a red square")]]
    assert grounding_ap(detections, layouts)["ap50"] == 0.0
    assert grounding_ap(detections, layouts, label_of=lambda o: o["phrase"])["ap50"] == pytest.approx(1.0)


def test_images_without_detections_or_objects_and_mismatched_lengths():
    layouts = [layout((BOX, "x", None)), layout()]
    assert grounding_ap([[], []], layouts) == {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    # A false positive in the image without objects counts once it outranks the true positive.
    assert grounding_ap([[det(BOX, "x", 0.9)], [det(BOX, "x", 0.1)]], layouts)["ap50"] == pytest.approx(1.0)
    assert grounding_ap([[det(BOX, "x", 0.9)], [det(BOX, "x", 0.99)]], layouts)["ap50"] == pytest.approx(0.5)
    assert grounding_ap([[], []], [layout(), layout()])["ap"] == 0.0  # undefined (no ground truth): 0, not -1
    with pytest.raises(ValueError, match="one per layout"):
        grounding_ap([[]], layouts)
    with pytest.raises(ValueError, match="one per layout"):
        miou([[]], layouts)


# --------------------------------------------------------------------------------------- transformers plumbing


# Every query of the tiny model predicts this normalised box (cx, cy, w, h) -> xyxy (0.2, 0.4, 0.4, 0.8).
FIXED_BOX_CXCYWH = (0.3, 0.6, 0.2, 0.4)
FIXED_BOX_XYXY = (0.2, 0.4, 0.4, 0.8)
NUM_QUERIES = 6


@pytest.fixture(scope="module")
def detr_dir(tmp_path_factory) -> str:
    """A tiny random DETR (ResNet backbone built from a config) saved locally, with its image processor.

    The box head is fixed (zero weights, bias = logit of FIXED_BOX_CXCYWH) so that box conversion is checkable;
    the class head favours class 2 ("cat") so that the label map is exercised; scores still vary per query.
    """
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor, ResNetConfig

    torch.manual_seed(0)
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                            out_features=["stage2"])
    config = DetrConfig(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, d_model=16,
                        encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                        encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=NUM_QUERIES,
                        id2label={0: "red square", 1: "blue circle", 2: "cat"},
                        label2id={"red square": 0, "blue circle": 1, "cat": 2})
    model = DetrForObjectDetection(config).eval()
    with torch.no_grad():
        last = model.bbox_predictor.layers[-1]
        last.weight.zero_()
        last.bias.copy_(torch.logit(torch.tensor(FIXED_BOX_CXCYWH)))
        model.class_labels_classifier.bias.copy_(torch.tensor([0.0, 0.0, 4.0, 0.0]))  # last: "no object"
    path = tmp_path_factory.mktemp("detr")
    model.save_pretrained(path)
    DetrImageProcessor(size={"shortest_edge": 32, "longest_edge": 64}).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def detr_images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), rng.integers(0, 256, (48, 64, 3), dtype=np.uint8),
            rng.integers(0, 256, (40, 24, 3), dtype=np.uint8)]


def test_transformers_detector_output_format_and_normalised_boxes(detr_dir, detr_images):
    detections = TransformersDetector(detr_dir, device="cpu", batch_size=2)(detr_images)
    assert len(detections) == len(detr_images)
    for dets in detections:
        assert len(dets) == NUM_QUERIES  # threshold 0 keeps every query
        scores = [d["score"] for d in dets]
        assert scores == sorted(scores, reverse=True) and all(0 < s <= 1 for s in scores)
        for d in dets:
            assert set(d) == {"box", "label", "score"} and isinstance(d["label"], str)
            # Same normalised box whatever the image's height and width: pixels were divided by the right sides.
            assert d["box"] == pytest.approx(FIXED_BOX_XYXY, abs=1e-4)


def test_transformers_detector_labels_come_from_id2label_through_the_label_map(detr_dir, detr_images):
    plain = TransformersDetector(detr_dir, device="cpu")(detr_images[:1])[0]
    assert {d["label"] for d in plain} == {"cat"}
    mapped = TransformersDetector(detr_dir, label_map={"cat": "green cross"}, device="cpu")(detr_images[:1])[0]
    assert {d["label"] for d in mapped} == {"green cross"}
    assert [d["score"] for d in mapped] == [d["score"] for d in plain]


def test_transformers_detector_threshold_drops_low_scores(detr_dir, detr_images):
    everything = TransformersDetector(detr_dir, device="cpu")(detr_images)
    scores = sorted(d["score"] for dets in everything for d in dets)
    threshold = scores[len(scores) // 2]
    assert scores[0] < threshold < scores[-1]  # some kept, some dropped
    kept = TransformersDetector(detr_dir, threshold=threshold, device="cpu")(detr_images)
    for all_dets, kept_dets in zip(everything, kept):
        expected = [d["score"] for d in all_dets if d["score"] > threshold]
        assert [d["score"] for d in kept_dets] == pytest.approx(expected)


def test_transformers_detector_feeds_grounding_ap(detr_dir, detr_images):
    detections = TransformersDetector(detr_dir, label_map={"cat": "green cross"}, device="cpu")(detr_images)
    best = [dets[:1] for dets in detections]  # the other queries repeat the box: duplicates are false positives
    layouts = [layout((FIXED_BOX_XYXY, "a green cross", "green cross"))] * len(detr_images)
    assert grounding_ap(best, layouts)["ap50"] == pytest.approx(1.0)
    assert 0 < grounding_ap(detections, layouts)["ap50"] < 1
    assert miou(detections, layouts) == pytest.approx(1.0, abs=1e-3)
    cats = [layout((FIXED_BOX_XYXY, "a cat", "cat"))] * len(detr_images)  # the model's name, not the mapped one
    assert grounding_ap(best, cats)["ap50"] == 0.0
