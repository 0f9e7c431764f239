"""Keypoint and text + image tokenizers: official names and shapes, null substitution, entity dropout, projection."""

import pytest
import torch
from diffusers.models.embeddings import GLIGENTextBoundingboxProjection

from gligen.nn.fourier import fourier_embed
from gligen.nn.tokenizers import (
    GroundingInputError,
    KeypointTokenizer,
    TextBoxTokenizer,
    TextImageBoxTokenizer,
    check_keypoint_grounding,
    project_image_embeddings,
    text_or_image_drop,
)


def randomise(module: torch.nn.Module) -> None:
    """Zero-initialised parameters would hide substitution mistakes: give the nulls and embeddings random values."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not name.startswith("linears"):
                p.normal_()


# ----- keypoints ------------------------------------------------------------------------------------------------
def test_keypoint_tokenizer_has_the_official_names_shapes_and_zero_init():
    tokenizer = KeypointTokenizer(in_dim=24, out_dim=16)
    shapes = {k: tuple(v.shape) for k, v in tokenizer.state_dict().items()}
    assert shapes == {  # official ldm/modules/diffusionmodules/keypoint_grounding_net.py PositionNet
        "person_embeddings": (8, 24),
        "keypoint_embeddings": (17, 24),
        "null_person_feature": (24,),
        "null_xy_feature": (32,),
        "linears.0.weight": (512, 24 + 32), "linears.0.bias": (512,),
        "linears.2.weight": (512, 512), "linears.2.bias": (512,),
        "linears.4.weight": (16, 512), "linears.4.bias": (16,),
    }
    for name in ("person_embeddings", "keypoint_embeddings", "null_person_feature", "null_xy_feature"):
        assert not getattr(tokenizer, name).any(), name
    assert isinstance(tokenizer.linears[1], torch.nn.SiLU) and isinstance(tokenizer.linears[3], torch.nn.SiLU)
    assert tokenizer(torch.rand(3, 8, 17, 2), torch.ones(3, 8, 17)).shape == (3, 136, 16)


def test_keypoint_tokens_follow_the_official_formula_person_major():
    torch.manual_seed(0)
    tokenizer = KeypointTokenizer(in_dim=6, out_dim=5)
    randomise(tokenizer)
    points, masks = torch.rand(2, 8, 17, 2), (torch.rand(2, 8, 17) > 0.3).float()
    out = tokenizer(points, masks)
    for b, p, k in [(0, 0, 0), (0, 3, 5), (1, 7, 16), (1, 2, 9)]:
        if masks[b, p, k]:
            identity = tokenizer.person_embeddings[p] + tokenizer.keypoint_embeddings[k]
            position = fourier_embed(points[b, p, k])
        else:
            identity, position = tokenizer.null_person_feature, tokenizer.null_xy_feature
        expected = tokenizer.linears(torch.cat([identity, position]))
        assert torch.allclose(out[b, p * 17 + k], expected, atol=1e-5)
    # the flat layout [B, 136, 2] is the same thing
    assert torch.equal(out, tokenizer(points.reshape(2, 136, 2), masks.reshape(2, 136)))


def test_missing_joints_get_the_null_features_whatever_they_hold():
    torch.manual_seed(0)
    tokenizer = KeypointTokenizer(in_dim=6, out_dim=5)
    randomise(tokenizer)
    masks = torch.zeros(1, 8, 17)
    masks[0, 0, :3] = 1
    a, b = tokenizer(torch.rand(1, 8, 17, 2), masks), tokenizer(torch.rand(1, 8, 17, 2), masks)
    null = tokenizer.linears(torch.cat([tokenizer.null_person_feature, tokenizer.null_xy_feature]))
    assert torch.allclose(a[0, 3:], null.expand(133, -1), atol=1e-5)
    assert torch.allclose(b[0, 3:], null.expand(133, -1), atol=1e-5)
    assert not torch.allclose(a[0, :3], b[0, :3])


def test_keypoint_tokenizer_refuses_a_wrong_count():
    tokenizer = KeypointTokenizer(in_dim=6, out_dim=5)
    with pytest.raises(ValueError, match="136 points"):
        tokenizer(torch.rand(1, 2, 17, 2), torch.ones(1, 2, 17))


def good_keypoints():
    points, masks = torch.rand(2, 8, 17, 2), torch.zeros(2, 8, 17)
    masks[:, 0] = 1
    return points, masks


def test_valid_keypoints_pass_and_missing_joints_are_not_inspected():
    points, masks = good_keypoints()
    points[0, 3, 4] = float("nan")
    points[1, 0, 2] = torch.tensor([1.5, -2.0])
    masks[1, 0, 2] = 0
    check_keypoint_grounding(points, masks, keys=["a", "b"])
    check_keypoint_grounding(points.reshape(2, 136, 2), masks.reshape(2, 136))


@pytest.mark.parametrize(
    "point, message",
    [([0.5, float("nan")], "not finite"), ([1.2, 0.5], "outside \\[0, 1\\]"), ([0.3, -0.1], "outside \\[0, 1\\]")],
)
def test_bad_keypoints_name_the_sample_person_and_joint(point, message):
    points, masks = good_keypoints()
    points[1, 2, 9], masks[1, 2, 9] = torch.tensor(point), 1
    with pytest.raises(GroundingInputError, match=f"sample 1 \\(img-b\\), person 2, keypoint 9.*{message}"):
        check_keypoint_grounding(points, masks, keys=["img-a", "img-b"])


def test_keypoint_shape_and_mask_problems():
    points, masks = good_keypoints()
    with pytest.raises(GroundingInputError, match="keypoints must be"):
        check_keypoint_grounding(torch.rand(2, 8, 16, 2), torch.ones(2, 8, 16))
    with pytest.raises(GroundingInputError, match="keypoints must be"):
        check_keypoint_grounding(torch.rand(2, 135, 2), torch.ones(2, 135))
    with pytest.raises(GroundingInputError, match="keypoints must be"):
        check_keypoint_grounding(torch.rand(2, 9, 17, 2), torch.ones(2, 9, 17))
    with pytest.raises(GroundingInputError, match="keypoint_masks shape"):
        check_keypoint_grounding(points, masks[:, :7])
    masks[1, 4, 4] = 0.5
    with pytest.raises(GroundingInputError, match="sample 1: keypoint_masks must be 0 or 1"):
        check_keypoint_grounding(points, masks)


# ----- text + image ---------------------------------------------------------------------------------------------
def test_text_image_tokenizer_matches_diffusers_names_shapes_and_outputs():
    torch.manual_seed(0)
    ours = TextImageBoxTokenizer(in_dim=24, out_dim=16)
    reference = GLIGENTextBoundingboxProjection(positive_len=24, out_dim=16, feature_type="text-image")
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    for name in ("null_text_feature", "null_image_feature", "null_position_feature"):
        assert not getattr(ours, name).any(), name
    randomise(ours)
    reference.load_state_dict(ours.state_dict())
    kwargs = {
        "boxes": torch.rand(2, 30, 4),
        "masks": (torch.rand(2, 30) > 0.3).float(),
        "phrases_masks": (torch.rand(2, 30) > 0.5).float(),
        "image_masks": (torch.rand(2, 30) > 0.5).float(),
        "phrases_embeddings": torch.randn(2, 30, 24),
        "image_embeddings": torch.randn(2, 30, 24),
    }
    out = ours(**kwargs)
    assert out.shape == (2, 60, 16)
    assert torch.allclose(out, reference(**kwargs), atol=1e-5)


def test_text_image_tokens_text_first_then_image_with_nulls():
    torch.manual_seed(0)
    tokenizer = TextImageBoxTokenizer(in_dim=6, out_dim=5)
    randomise(tokenizer)
    boxes, texts, images = torch.rand(1, 3, 4), torch.randn(1, 3, 6), torch.randn(1, 3, 6)
    masks = torch.tensor([[1.0, 1, 0]])
    phrases_masks, image_masks = torch.tensor([[1.0, 0, 0]]), torch.tensor([[0.0, 1, 0]])
    out = tokenizer(boxes, masks, phrases_masks, image_masks, texts, images)
    position = fourier_embed(boxes[0])
    t, i = tokenizer.linears_text, tokenizer.linears_image
    nt, ni, npos = tokenizer.null_text_feature, tokenizer.null_image_feature, tokenizer.null_position_feature
    expected = [
        t(torch.cat([texts[0, 0], position[0]])), t(torch.cat([nt, position[1]])), t(torch.cat([nt, npos])),
        i(torch.cat([ni, position[0]])), i(torch.cat([images[0, 1], position[1]])), i(torch.cat([ni, npos])),
    ]
    assert torch.allclose(out[0], torch.stack(expected), atol=1e-5)


def test_text_or_image_drop_never_both_about_half_only_on_valid_boxes():
    masks = torch.zeros(400, 30)
    masks[:, :20] = 1
    phrases_masks, image_masks = text_or_image_drop(masks, torch.Generator().manual_seed(0))
    assert phrases_masks.dtype == image_masks.dtype == masks.dtype
    assert not (phrases_masks[:, 20:].any() or image_masks[:, 20:].any())  # padding stays padding
    valid = masks.bool()
    assert ((phrases_masks + image_masks)[valid] >= 1).all()  # never both dropped
    dropped_text = (phrases_masks == 0)[valid].float().mean()
    dropped_image = (image_masks == 0)[valid].float().mean()
    assert 0.23 < dropped_text < 0.27 and 0.23 < dropped_image < 0.27  # p = 0.5 of a drop, then 50/50
    assert 0.48 < (dropped_text + dropped_image) < 0.52
    # reproducible from the generator
    again = text_or_image_drop(masks, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], phrases_masks) and torch.equal(again[1], image_masks)


def test_project_image_embeddings_on_hand_made_tensors():
    # text projection W [proj_dim=2, text_dim=3]: text features t project to t @ W.T, images come back as i @ W
    weight = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])
    image = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    out = project_image_embeddings(image, weight)
    back = torch.tensor([[1.0, 0.0, 2.0], [0.0, 6.0, 0.0], [1.0, 3.0, 2.0]])
    expected = back / back.norm(dim=-1, keepdim=True) * 28.7
    assert out.shape == (3, 3)
    assert torch.allclose(out, expected)
    assert torch.allclose(out.norm(dim=-1), torch.full((3,), 28.7))
    assert torch.allclose(project_image_embeddings(image * 5, weight, norm=1.0), expected / 28.7)  # scale-free


def test_text_box_tokenizer_is_untouched():
    assert {k for k in TextBoxTokenizer(8, 8).state_dict()} == {
        "linears.0.weight", "linears.0.bias", "linears.2.weight", "linears.2.bias", "linears.4.weight",
        "linears.4.bias", "null_positive_feature", "null_position_feature",
    }
