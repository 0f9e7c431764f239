import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from gligen.metrics.keypoints import keypoint_average_precision, pck
from gligen.toy import evaluate, fidelity, world
from gligen.toy.evaluate import detect_keypoints, detect_objects, evaluate_boxes, evaluate_keypoints


def decode(png: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(png)).convert("RGB"))


def toy_set(n: int, family: str = "objects", resolution: int | None = None, split: str = "test"):
    samples = [world.make_sample(split, i, family=family, resolution=resolution, with_entities=False) for i in range(n)]
    return [decode(s["png"]) for s in samples], [s["json"] for s in samples]


def layout(objects, resolution=32):
    return {"schema_version": 1, "kind": "detection", "source_id": "hand", "width": resolution,
            "height": resolution, "objects": [{"box": list(b), "phrase": c, "category": c, "entity_image": None}
                                              for c, b in objects]}


@pytest.fixture(scope="module")
def real_32():
    return toy_set(60)


@pytest.mark.parametrize("resolution", [32, 64])
def test_boxes_on_real_toy_images_score_near_perfect(resolution, real_32):
    images, layouts = real_32 if resolution == 32 else toy_set(30, resolution=resolution)
    scores = evaluate_boxes(images, layouts)
    print(f"\nreal toy images at {resolution}px: {scores}")
    assert scores["ap50"] >= 0.95 and scores["ap75"] >= 0.95 and scores["miou"] >= 0.95
    assert scores["count_accuracy"] >= 0.95 and scores["caption_accuracy"] >= 0.95


def test_boxes_survive_mild_blur_and_noise(real_32):
    # Generated images are soft and noisy; the read-back must not need crisp palette colours.
    from PIL import ImageFilter

    images, layouts = real_32
    rng = np.random.default_rng(0)
    degraded = [np.clip(np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(0.6)), dtype=np.float32)
                        + rng.normal(0, 20, im.shape), 0, 255).astype(np.uint8) for im in images]
    scores = evaluate_boxes(degraded, layouts)
    print(f"\nblurred (sigma 0.6) + noisy (sigma 20) toy images at 32px: {scores}")
    assert scores["ap50"] >= 0.95 and scores["count_accuracy"] >= 0.95


def test_boxes_against_shuffled_layouts_score_low(real_32):
    images, layouts = real_32
    scores = evaluate_boxes(images, layouts[1:] + layouts[:1])
    print(f"\nshuffled layouts: {scores}")
    assert scores["ap50"] < 0.2 and scores["miou"] < 0.3 and scores["caption_accuracy"] < 0.3


def test_boxes_against_random_layouts_score_low(real_32):
    images, _ = real_32
    rng = np.random.default_rng(0)
    random_layouts = []
    for _ in images:
        objects = []
        for _ in range(int(rng.integers(1, 5))):
            x0, y0 = rng.uniform(0, 0.6, size=2)
            w, h = rng.uniform(0.25, 0.4, size=2)
            objects.append((world.CATEGORIES[int(rng.integers(len(world.CATEGORIES)))], (x0, y0, x0 + w, y0 + h)))
        random_layouts.append(layout(objects))
    scores = evaluate_boxes(images, random_layouts)
    print(f"\nrandom layouts: {scores}")
    assert scores["ap50"] < 0.2


def test_noise_pixels_of_the_same_colour_do_not_inflate_the_box():
    rng = np.random.default_rng(1)
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[10:20, 12:24] = (240, 20, 10)  # a slightly off-palette red rectangle, pixel box [12, 10, 24, 20)
    for y, x in rng.integers(0, 32, size=(25, 2)):  # scattered single red pixels everywhere
        if not (9 <= y <= 20 and 11 <= x <= 24):
            image[y, x] = (255, 0, 0)
    detections = detect_objects(image)
    assert len(detections) == 1
    assert detections[0].category == "red square"
    assert detections[0].box == (12 / 32, 10 / 32, 24 / 32, 20 / 32)


@pytest.mark.parametrize("shape", world.SHAPES)
def test_each_shape_and_colour_is_read_back(shape):
    for colour in world.COLOURS:
        scene = world.Scene(resolution=32, objects=[world.SceneObject(shape, colour, (5, 7, 16, 17))])
        (det,) = detect_objects(world.render_scene(scene))
        assert (det.colour, det.shape, det.category) == (colour, shape, f"{colour} {shape}")
        assert det.box == (5 / 32, 7 / 32, 16 / 32, 17 / 32) and 0 < det.score <= 1


def test_scores_rank_clean_objects_above_ragged_blobs():
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[2:12, 2:12] = (0, 0, 255)  # clean blue square
    rng = np.random.default_rng(0)
    ragged = rng.random((10, 10)) < 0.6
    ragged[:, 0] = ragged[0, :] = True  # keep it one component
    image[18:28, 18:28][ragged] = (40, 220, 30)  # noisy, off-palette green blob
    clean, noisy = sorted(detect_objects(image), key=lambda d: d.colour != "blue")
    assert clean.category == "blue square" and clean.score > noisy.score


def test_miou_count_and_caption_accuracy_on_hand_made_cases():
    scene = world.Scene(resolution=32, objects=[world.SceneObject("square", "red", (0, 0, 10, 10)),
                                                world.SceneObject("circle", "blue", (20, 20, 30, 30))])
    image = world.render_scene(scene)
    exact = layout([("red square", (0, 0, 10 / 32, 10 / 32)), ("blue circle", (20 / 32, 20 / 32, 30 / 32, 30 / 32))])
    assert evaluate_boxes([image], [exact]) == pytest.approx(
        {"ap": 1.0, "ap50": 1.0, "ap75": 1.0, "miou": 1.0, "count_accuracy": 1.0, "caption_accuracy": 1.0,
         "coarse_ap50": 1.0, "coarse_miou": 1.0, "colour_recall": 1.0, "shape_accuracy_given_colour": 1.0})
    # Red box shifted by half its width: IoU 1/3; the green cross is not drawn at all: IoU 0, caption missed.
    shifted = layout([("red square", (5 / 32, 0, 15 / 32, 10 / 32)), ("blue circle", exact["objects"][1]["box"]),
                      ("green cross", (0.5, 0, 0.8, 0.3))])
    scores = evaluate_boxes([image], [shifted])
    assert scores["miou"] == pytest.approx((1 / 3 + 1 + 0) / 3)
    assert scores["count_accuracy"] == 0.0 and scores["caption_accuracy"] == 0.0
    assert scores["colour_recall"] == pytest.approx(2 / 3) and scores["shape_accuracy_given_colour"] == 1.0
    # Right places, wrong colours: no box counts.
    swapped = layout([("blue square", (0, 0, 10 / 32, 10 / 32)), ("red circle", (20 / 32, 20 / 32, 30 / 32, 30 / 32))])
    assert evaluate_boxes([image], [swapped])["ap50"] == 0.0
    # Right colours in the right places, wrong shapes: misses as classes, hits by colour (coarse placement).
    reshaped = layout([("red cross", (0, 0, 10 / 32, 10 / 32)), ("blue square", (20 / 32, 20 / 32, 30 / 32, 30 / 32))])
    scores = evaluate_boxes([image], [reshaped])
    assert scores["ap50"] == 0.0 and scores["coarse_ap50"] == pytest.approx(1.0) and scores["coarse_miou"] == 1.0
    assert scores["colour_recall"] == 1.0 and scores["shape_accuracy_given_colour"] == 0.0


@pytest.fixture(scope="module")
def real_persons():
    return toy_set(40, family="persons")


def test_keypoints_on_real_toy_images_score_near_perfect(real_persons):
    images, layouts = real_persons
    scores = evaluate_keypoints(images, layouts)
    print(f"\nreal person images at {world.DEFAULT_RESOLUTION}px: {scores}")
    assert scores["pck"] >= 0.95 and scores["oks_ap"] >= 0.95 and scores["oks_ap50"] >= 0.95


def test_keypoints_survive_mild_blur_and_noise(real_persons):
    from PIL import ImageFilter

    images, layouts = real_persons
    rng = np.random.default_rng(0)
    degraded = [np.clip(np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(0.5)), dtype=np.float32)
                        + rng.normal(0, 15, im.shape), 0, 255).astype(np.uint8) for im in images]
    scores = evaluate_keypoints(degraded, layouts)
    print(f"\nblurred (sigma 0.5) + noisy (sigma 15) person images: {scores}")
    assert scores["pck"] >= 0.95 and scores["oks_ap50"] >= 0.95


def test_keypoints_against_shuffled_layouts_score_low(real_persons):
    images, layouts = real_persons
    scores = evaluate_keypoints(images, layouts[1:] + layouts[:1])
    print(f"\nshuffled person layouts: {scores}")
    assert scores["pck"] < 0.3 and scores["oks_ap50"] < 0.3


def shifted(person, dx, dy):
    return dataclasses.replace(person, joints=person.joints + (dx, dy),
                               head_centre=(person.head_centre[0] + dx, person.head_centre[1] + dy))


def test_detect_keypoints_separates_two_persons_left_to_right():
    # Toy scenes hold one figure, generated images may hold more: two 32 px figures pushed to the two sides of a
    # 64 px canvas, far enough apart for the read-back's joining dilation (2 x 6 px at 64), the right one listed first.
    figures = []
    for i in range(20):
        person = world.make_scene("test", i, family="persons")[0].persons[0]
        x0, _, x1, _ = world.tight_box(world.render_scene(world.Scene(resolution=32, persons=[person])).any(-1))
        figures.append((x1 - x0, x0, person))
    (wa, xa, a), (wb, xb, b) = sorted(figures, key=lambda f: f[0])[:2]
    assert 64 - wa - wb >= 14
    left, right = shifted(a, -xa, 0), shifted(b, 64 - wb - xb, 24)
    scene = world.Scene(resolution=64, persons=[right, left])
    found = detect_keypoints(world.render_scene(scene))
    truth = world.scene_annotation(scene, "grounding", "two", with_entities=False)["persons"][::-1]
    assert found.shape == (2, 17, 3)
    np.testing.assert_allclose(found, np.array([p["keypoints"] for p in truth]), atol=1e-6)


def test_pck_threshold_is_relative_to_the_person_box():
    images, layouts = toy_set(1, family="persons")
    gt = np.array([p["keypoints"] for p in layouts[0]["persons"]])
    kps = gt[0]
    scale = max(np.ptp(kps[:, 0]), np.ptp(kps[:, 1]))
    for shift, expected in ((0.05, 1.0), (0.2, 0.0)):
        moved = gt.copy()
        moved[0, :, 0] += shift * scale
        single = {**layouts[0], "persons": layouts[0]["persons"][:1]}
        assert pck([moved[:1]], [single]) == expected
    missing = gt[:1].copy()
    missing[0, :5, 2] = 0  # face not found: 5 of 17 joints wrong
    assert pck([missing], [{**layouts[0], "persons": layouts[0]["persons"][:1]}]) == pytest.approx(12 / 17)
    assert pck([np.zeros((0, 17, 3))], [layouts[0]]) == 0.0


def test_pck_uses_the_person_size_not_the_image_size():
    # A small person (keypoint box 0.2 x 0.3 of the image): 0.05 of the image is 1/6 of its size, too far.
    gt = np.zeros((17, 3))
    gt[:, 0] = np.linspace(0.4, 0.6, 17)
    gt[:, 1] = np.linspace(0.2, 0.5, 17)
    gt[:, 2] = 2
    single = layout([])
    single["persons"] = [{"keypoints": gt.tolist()}]
    near, far = gt.copy(), gt.copy()
    near[:, 0] += 0.02  # 0.067 of the person size
    far[:, 0] += 0.05
    assert pck([near[None]], [single]) == 1.0 and pck([far[None]], [single]) == 0.0


def _single_person_image():
    images, layouts = toy_set(1, family="persons")
    return images[0].copy(), np.array(layouts[0]["persons"][0]["keypoints"])


def test_stray_pixels_of_a_joint_colour_do_not_move_the_joint():
    image, truth = _single_person_image()
    from scipy.ndimage import binary_dilation

    nose = (image == world.KEYPOINT_COLOURS[0]).all(axis=-1)
    away_from_nose = ~binary_dilation(nose, structure=np.ones((3, 3), bool), iterations=3)
    ys, xs = np.nonzero((image == world.LIMB_COLOUR).all(axis=-1) & away_from_nose)
    pick = np.random.default_rng(0).choice(len(xs), size=3, replace=False)
    image[ys[pick], xs[pick]] = world.KEYPOINT_COLOURS[0]  # three lone "nose" pixels on the limbs
    (found,) = detect_keypoints(image)
    np.testing.assert_allclose(found, truth, atol=1e-6)


def test_a_joint_cut_off_its_limb_still_belongs_to_its_person():
    # Generated images break thin limbs: a wrist separated by a one-pixel gap must still be read.
    from scipy.ndimage import binary_dilation

    image, truth = _single_person_image()
    wrist = (image == world.KEYPOINT_COLOURS[9]).all(axis=-1)
    ring = binary_dilation(wrist, structure=np.ones((3, 3), bool)) & ~wrist
    image[ring] = 0
    (found,) = detect_keypoints(image)
    np.testing.assert_allclose(found, truth, atol=1e-6)


def test_oks_ap_drops_when_joints_move():
    images, layouts = toy_set(10, family="persons")
    rng = np.random.default_rng(0)
    predicted, scores = [], []
    for image in images:
        kps, s = evaluate.detect_persons(image)
        jitter = rng.normal(0, 0.08, size=kps[..., :2].shape)  # ~8% of the image side per joint
        predicted.append(np.concatenate([kps[..., :2] + jitter, kps[..., 2:]], axis=-1))
        scores.append(s)
    jittered = keypoint_average_precision(predicted, scores, layouts)
    assert jittered["ap"] < 0.5


# ----- styles and fidelity -------------------------------------------------------------------------------------

def styled_set(n: int):
    scenes = [world.make_scene("val", i, family="styled")[0] for i in range(n)]
    return [world.render_scene(s) for s in scenes], [s.style for s in scenes]


def test_the_style_of_real_images_is_read_back_exactly():
    images, styles = styled_set(45)
    assert [fidelity.read_style(im) for im in images] == styles
    plain, _ = toy_set(10)
    assert {fidelity.read_style(im) for im in plain} == {"plain"}
    # a background of noise has no style
    noise = np.random.default_rng(0).integers(0, 90, (32, 32, 3), dtype=np.uint8)
    assert fidelity.read_style(noise) not in world.STYLES


def test_fidelity_error_is_zero_on_real_images_and_grows_with_damage():
    objects, _ = toy_set(20)
    styled, _ = styled_set(20)
    real = objects + styled
    assert max(fidelity.fidelity_error(im) for im in real) == 0.0
    from gligen.toy.report import degrade

    rng = np.random.default_rng(1)
    for kind, mild, strong in (("noise", 12, 40), ("blur", 0.5, 1.5), ("shift", 30, 90)):
        low = np.mean([fidelity.fidelity_error(degrade(im, kind, mild, rng)) for im in real])
        high = np.mean([fidelity.fidelity_error(degrade(im, kind, strong, rng)) for im in real])
        assert 0 < high and low < high, (kind, low, high)


def test_fidelity_error_counts_broken_shapes_and_stray_pixels():
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[8:20, 8:20] = world.PALETTE["red"]  # a clean square
    assert fidelity.fidelity_error(image) == 0.0
    bitten = image.copy()
    bitten[8:12, 8:12] = 0  # a corner missing, nothing on top: 16 pixels off the template
    stray = image.copy()
    stray[28, 28] = world.PALETTE["blue"]  # one stray pixel
    assert fidelity.fidelity_error(bitten) == pytest.approx(16 / 1024, abs=8 / 1024)
    assert fidelity.fidelity_error(stray) == pytest.approx(1 / 1024)
    occluded = image.copy()
    occluded[8:12, 8:12] = world.PALETTE["green"]  # the corner under another object: not a defect of the square
    occluded[6:12, 6:12] = world.PALETTE["green"]
    assert fidelity.fidelity_error(occluded) == 0.0


def test_image_scorer_scores_what_each_layout_asks():
    images, styles = styled_set(6)
    layouts = [{"caption": f"a red square on a {s} background", "objects": []} for s in styles]
    layouts[0]["caption"] = "a red square"  # asks no style
    layouts[1]["caption"] = f"a red square on a {next(s for s in world.STYLES if s != styles[1])} background"
    layouts[2] = {**layouts[2], "persons": [{"keypoints": [[0.5, 0.5, 2]] * 17}]}  # a person layout: no fidelity
    scores = fidelity.ToyImageScorer()(images, layouts)
    assert scores["style_adherence"] == [None, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert scores["fidelity_error"] == [0.0, 0.0, None, 0.0, 0.0, 0.0]


def test_quality_ordering_needs_real_vae_base_then_damage_and_damage_that_grows():
    from gligen.toy.report import DEGRADATIONS, quality_ordering

    def sets(vae, base, ladder):
        found = {"real": {"fidelity_error": 0.0, "sem": 0.0},
                 "vae_reconstruction": {"fidelity_error": vae, "sem": 0.01},
                 "base_ldm": {"fidelity_error": base, "sem": 0.01}}
        found.update({name: {"fidelity_error": value, "sem": 0.01}
                      for (name, _, _), value in zip(DEGRADATIONS, ladder)})
        return found

    growing = [0.1, 0.3, 0.5, 0.1, 0.3, 0.5, 0.3, 0.9]  # noise x3, blur x3, shift x2 (DEGRADATIONS order)
    assert quality_ordering(sets(0.1, 0.2, growing))["ordered"]
    assert not quality_ordering(sets(0.3, 0.2, growing))["ordered"]  # VAE worse than the base
    assert not quality_ordering(sets(0.1, 0.6, growing))["ordered"]  # the base worse than the strongest damage
    shrinking = [0.5, 0.3, 0.4, *growing[3:]]
    assert not quality_ordering(sets(0.1, 0.2, shrinking))["ordered"]  # noise 16 worse than noise 32
