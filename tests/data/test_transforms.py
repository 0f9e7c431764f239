import numpy as np
import pytest
import torch
from PIL import Image

from gligen.data.decode import SkipCounter
from gligen.data.schema import Annotation, DecodedSample, ObjectAnnotation, PersonAnnotation
from gligen.data.transforms import (
    Crop,
    DataConfigError,
    TransformConfig,
    choose_crop,
    crop_boxes,
    crop_keypoints,
    filter_boxes,
    flip_boxes,
    flip_keypoints,
    image_to_tensor,
    pad_grounding,
    pad_keypoints,
    resize_short_side,
    resized_size,
    transform_or_skip,
    transform_sample,
)


class FixedRng:
    """Stands in for np.random.Generator: the flip coin always lands 'flip', crops start at the low end."""

    def random(self):
        return 0.0

    def integers(self, low, high):
        return low


def test_resized_size_short_side():
    assert resized_size(16, 8, 4) == (8, 4)
    assert resized_size(8, 20, 4) == (4, 10)
    assert resized_size(300, 200, 512) == (768, 512)
    assert resize_short_side(Image.new("RGB", (30, 20)), 10).size == (15, 10)


def test_choose_crop_centre_and_random():
    assert choose_crop(200, 100, 100) == Crop(200, 100, 50, 0, 100)
    assert choose_crop(100, 101, 100) == Crop(100, 101, 0, 0, 100)
    rng = np.random.default_rng(0)
    lefts = {choose_crop(200, 100, 100, rng).left for _ in range(200)}
    assert min(lefts) >= 0 and max(lefts) <= 100 and len(lefts) > 50


# Image 200x100 at resolution 100: no resize, centre crop x in [50, 150) pixels.
CROP = Crop(200, 100, 50, 0, 100)


def test_crop_boxes_hand_computed():
    boxes = np.array([[0.25, 0.0, 0.5, 1.0], [0.5, 0.25, 0.75, 0.75]])
    # pixel x 50..100 -> crop 0..50 -> 0..0.5 ; pixel x 100..150 -> 0.5..1.0
    assert np.allclose(crop_boxes(boxes, CROP), [[0.0, 0.0, 0.5, 1.0], [0.5, 0.25, 1.0, 0.75]])


def test_filter_boxes_drop_clip_area_and_order():
    boxes = crop_boxes(np.array([
        [0.0, 0.0, 0.2, 0.5],    # pixels 0..40: fully left of the crop -> dropped
        [0.2, 0.0, 0.3, 0.5],    # pixels 40..60 -> -0.1..0.1 -> clipped 0..0.1, area 0.05 -> kept
        [0.2, 0.0, 0.26, 0.1],   # pixels 40..52 -> clipped 0..0.02 x 0.1: area 0.002 < 0.01 -> dropped
        [0.3, 0.0, 0.7, 1.0],    # pixels 60..140 -> 0.1..0.9, area 0.8 -> kept, largest
        [0.75, 0.0, 1.0, 1.0],   # pixels 150..200 -> x0 = 1.0: touches only the border -> dropped
    ]), CROP)
    kept, idx = filter_boxes(boxes, min_area=0.01, max_objects=30)
    assert idx.tolist() == [3, 1]
    assert np.allclose(kept, [[0.1, 0.0, 0.9, 1.0], [0.0, 0.0, 0.1, 0.5]])


def test_filter_boxes_keeps_largest_max_objects():
    sizes = [0.2, 0.5, 0.3, 0.5, 0.4]
    boxes = np.array([[0, 0, s, s] for s in sizes])
    kept, idx = filter_boxes(boxes, min_area=0.0, max_objects=3)
    assert idx.tolist() == [1, 3, 4]  # ties keep input order
    assert np.allclose(kept[:, 2], [0.5, 0.5, 0.4])


def test_flip_boxes():
    assert np.allclose(flip_boxes(np.array([[0.1, 0.2, 0.4, 0.6]])), [[0.6, 0.2, 0.9, 0.6]])


def test_crop_keypoints_outside_become_invisible():
    kps = np.zeros((1, 17, 3))
    kps[0, 0] = [0.5, 0.5, 2]   # pixel 100 -> crop x 0.5
    kps[0, 1] = [0.1, 0.5, 2]   # pixel 20 -> outside
    kps[0, 2] = [0.7, 0.25, 1]  # pixel 140 -> 0.9, stays labelled-not-visible
    out = crop_keypoints(kps, CROP)
    assert np.allclose(out[0, 0], [0.5, 0.5, 2])
    assert np.allclose(out[0, 1], [0, 0, 0])
    assert np.allclose(out[0, 2], [0.9, 0.25, 1])


def test_flip_keypoints_mirrors_and_swaps_left_right():
    kps = np.zeros((1, 17, 3))
    kps[0, 0] = [0.3, 0.1, 2]    # nose stays index 0
    kps[0, 1] = [0.2, 0.3, 2]    # left eye
    kps[0, 2] = [0.4, 0.3, 1]    # right eye
    kps[0, 15] = [0.1, 0.9, 2]   # left ankle; right ankle (16) unlabelled
    out = flip_keypoints(kps)
    assert np.allclose(out[0, 0], [0.7, 0.1, 2])
    assert np.allclose(out[0, 1], [0.6, 0.3, 1])   # the mirrored right eye is now the left eye
    assert np.allclose(out[0, 2], [0.8, 0.3, 2])
    assert np.allclose(out[0, 16], [0.9, 0.9, 2])
    assert np.allclose(out[0, 15], [0, 0, 0])      # unlabelled stays (0, 0, 0), not (1, 0, 0)
    assert np.allclose(flip_keypoints(out), kps)


def test_pad_grounding():
    out = pad_grounding(np.array([[0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]]), ["cat", "dog"], max_objects=30)
    assert out["boxes"].shape == (30, 4) and out["boxes"].dtype == torch.float32
    assert torch.allclose(out["boxes"][:2], torch.tensor([[0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]]))
    assert out["boxes"][2:].abs().sum() == 0
    assert out["masks"].tolist() == [1.0, 1.0] + [0.0] * 28
    assert out["phrases"] == ["cat", "dog"] + [""] * 28
    with pytest.raises(ValueError):
        pad_grounding(np.zeros((31, 4)), ["x"] * 31, max_objects=30)


def test_pad_keypoints_visibility_two_only_and_most_visible_first():
    kps = np.zeros((10, 17, 3))
    for p in range(10):
        kps[p, :p, :] = [0.5, 0.25, 2]  # person p has p visible keypoints
    kps[9, 16] = [0.7, 0.7, 1]           # labelled but not visible: not present
    out = pad_keypoints(kps, max_persons=8)
    assert out["keypoints"].shape == (8, 17, 2) and out["keypoint_masks"].shape == (8, 17)
    assert out["keypoint_masks"].sum(1).tolist() == [9, 8, 7, 6, 5, 4, 3, 2]
    assert out["keypoint_masks"][0, 16] == 0 and out["keypoints"][0, 16].abs().sum() == 0
    assert torch.allclose(out["keypoints"][0, 0], torch.tensor([0.5, 0.25]))


def test_image_to_tensor_range():
    img = Image.new("RGB", (2, 1))
    img.putpixel((0, 0), (255, 0, 255))
    t = image_to_tensor(img)
    assert t.shape == (3, 1, 2)
    assert t[:, 0, 0].tolist() == [1.0, -1.0, 1.0] and t[:, 0, 1].tolist() == [-1.0, -1.0, -1.0]


def _two_colour_sample(kind="grounding", persons=None):
    # 16x8 image: left half red, right half blue. Object = the red half's right part.
    arr = np.zeros((8, 16, 3), np.uint8)
    arr[:, :8, 0] = 255
    arr[:, 8:, 2] = 255
    ann = Annotation(kind=kind, source_id="t", width=16, height=8,
                     objects=(ObjectAnnotation((0.25, 0.0, 0.5, 1.0), "red thing"),
                              ObjectAnnotation((0.0, 0.0, 0.1, 1.0), "outside")),
                     persons=persons)
    return DecodedSample(key="k", url="u", annotation=ann, caption="a caption", image=Image.fromarray(arr),
                         arrays={"caption_embeds.npy": np.ones((77, 4), np.float32)})


def test_transform_sample_centre_crop_no_flip():
    out = transform_sample(_two_colour_sample(), TransformConfig(resolution=8), rng=None)
    px = out["pixel_values"]
    assert px.shape == (3, 8, 8)
    assert px[0, :, :4].min() == 1 and px[2, :, 4:].min() == 1  # centre crop: columns 4..11
    assert torch.allclose(out["boxes"][0], torch.tensor([0.0, 0.0, 0.5, 1.0]))  # pixels 4..8 -> 0..4 of 8
    assert out["masks"].sum() == 1 and out["phrases"][:2] == ["red thing", ""]
    assert out["caption"] == "a caption" and out["caption_embeds"].shape == (77, 4)
    assert "keypoints" not in out


def test_transform_sample_flip_moves_pixels_boxes_and_keypoints_together():
    kps = np.zeros((17, 3), np.float32)
    kps[5] = [0.375, 0.5, 2]  # left shoulder at pixel x 6 -> crop x 2/8 = 0.25
    sample = _two_colour_sample(persons=(PersonAnnotation(kps),))
    out = transform_sample(sample, TransformConfig(resolution=8, random_flip=True), rng=FixedRng())
    px = out["pixel_values"]
    assert px[2, :, :4].min() == 1 and px[0, :, 4:].min() == 1  # blue now on the left
    assert torch.allclose(out["boxes"][0], torch.tensor([0.5, 0.0, 1.0, 1.0]))
    assert torch.allclose(out["keypoints"][0, 6], torch.tensor([0.75, 0.5]))  # became the right shoulder
    assert out["keypoint_masks"][0].tolist() == [0.0] * 6 + [1.0] + [0.0] * 10


def test_transform_sample_random_crop_uses_rng():
    out = transform_sample(_two_colour_sample(), TransformConfig(8, random_crop=True, random_flip=False), FixedRng())
    assert out["pixel_values"][0].min() == 1  # window at left = 0: all red
    assert torch.allclose(out["boxes"][1], torch.tensor([0.0, 0.0, 0.2, 1.0]))  # 'outside' is now inside


def test_detection_kind_gets_null_caption_and_keeps_caption_embeds_for_the_module_to_null():
    out = transform_sample(_two_colour_sample(kind="detection"), TransformConfig(8), rng=None)
    # embeddings stay so a mixed batch keeps its precomputed path; GLIGENModule nulls kind "detection" itself
    assert out["caption"] == "" and out["kind"] == "detection" and "caption_embeds" in out


def test_transform_sample_latents_pick_flip_variant():
    arrays = {"latent_mean.npy": np.zeros((4, 1, 1), np.float32), "latent_std.npy": np.ones((4, 1, 1), np.float32),
              "latent_mean_flip.npy": np.full((4, 1, 1), 7, np.float32),
              "latent_std_flip.npy": np.full((4, 1, 1), 3, np.float32),
              "phrase_embeds.npy": np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]], np.float32)}
    ann = Annotation(kind="grounding", source_id="t", width=8, height=8,
                     objects=(ObjectAnnotation((0.0, 0.0, 0.05, 0.05), "tiny"),
                              ObjectAnnotation((0.1, 0.2, 0.4, 0.6), "a"),
                              ObjectAnnotation((0.0, 0.0, 1.0, 1.0), "b")))
    sample = DecodedSample(key="k", url="u", annotation=ann, caption="c", arrays=arrays)
    out = transform_sample(sample, TransformConfig(512), rng=FixedRng())
    assert "pixel_values" not in out
    assert out["latent_mean"].unique().tolist() == [7.0] and out["latent_std"].unique().tolist() == [3.0]
    # tiny box dropped, largest first, flipped; phrase embeddings follow their objects
    assert out["phrases"][:3] == ["b", "a", ""]
    assert torch.allclose(out["boxes"][:2], torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.6, 0.2, 0.9, 0.6]]))
    assert out["phrase_embeds"][:3, 0].tolist() == [3.0, 2.0, 0.0]
    unflipped = transform_sample(sample, TransformConfig(512), rng=None)
    assert unflipped["latent_mean"].unique().tolist() == [0.0]
    del arrays["latent_mean_flip.npy"], arrays["latent_std_flip.npy"]
    # random_flip on latents that cannot flip: an error naming the sample and the fix, not a flip silently never done,
    # and not a skip (every sample would be skipped): it passes through the skip accounting
    for transform in (lambda: transform_sample(sample, TransformConfig(512), rng=FixedRng()),
                      lambda: transform_or_skip(sample, TransformConfig(512), FixedRng(), SkipCounter())):
        with pytest.raises(DataConfigError, match="u key k: random_flip is on .* precompute with --flip"):
            transform()
    no_flip_variant = transform_sample(sample, TransformConfig(512, random_flip=False), rng=FixedRng())
    assert torch.allclose(no_flip_variant["boxes"][1], torch.tensor([0.1, 0.2, 0.4, 0.6]))
    assert transform_sample(sample, TransformConfig(512), rng=None)["latent_mean"].unique().tolist() == [0.0]
