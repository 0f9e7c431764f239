import math

import pytest
import torch
from diffusers.models.embeddings import GLIGENTextBoundingboxProjection

from gligen.nn.tokenizers import GroundingInputError, TextBoxTokenizer, check_box_grounding


def test_text_box_tokenizer_matches_diffusers_names_shapes_and_outputs():
    torch.manual_seed(0)
    ours = TextBoxTokenizer(positive_len=24, out_dim=16)
    reference = GLIGENTextBoundingboxProjection(positive_len=24, out_dim=16, feature_type="text-only")
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    with torch.no_grad():
        ours.null_positive_feature.normal_(), ours.null_position_feature.normal_()
    reference.load_state_dict(ours.state_dict())
    boxes, masks, embeds = torch.rand(2, 30, 4), (torch.rand(2, 30) > 0.5).float(), torch.randn(2, 30, 24)
    assert torch.allclose(ours(boxes, masks, embeds), reference(boxes, masks, embeds), atol=1e-5)


def test_padded_objects_get_the_learned_null_features_whatever_they_hold():
    torch.manual_seed(0)
    tokenizer = TextBoxTokenizer(positive_len=8, out_dim=6)
    with torch.no_grad():
        tokenizer.null_positive_feature.normal_(), tokenizer.null_position_feature.normal_()
    masks = torch.tensor([[1.0, 0.0, 0.0]])
    a = tokenizer(torch.rand(1, 3, 4), masks, torch.randn(1, 3, 8))
    b = tokenizer(torch.rand(1, 3, 4), masks, torch.randn(1, 3, 8))
    null_token = tokenizer.linears(torch.cat([tokenizer.null_positive_feature, tokenizer.null_position_feature]))
    assert torch.allclose(a[0, 1], null_token, atol=1e-6) and torch.allclose(b[0, 2], null_token, atol=1e-6)
    assert not torch.allclose(a[0, 0], b[0, 0])  # real objects are not replaced


def good():
    boxes = torch.zeros(2, 30, 4)
    masks = torch.zeros(2, 30)
    boxes[:, 0] = torch.tensor([0.1, 0.2, 0.5, 0.6])
    masks[:, 0] = 1
    phrases = [["a cat"] + [""] * 29, ["a dog"] + [""] * 29]
    return boxes, masks, phrases


def test_valid_input_passes_and_padding_is_not_inspected():
    boxes, masks, phrases = good()
    boxes[0, 5] = float("nan")  # padded slot: replaced by null features, so allowed
    check_box_grounding(boxes, masks, phrases, keys=["a", "b"])


@pytest.mark.parametrize(
    "box, message",
    [
        ([0.1, 0.2, 1.5, 0.6], "outside \\[0, 1\\]"),
        ([-0.1, 0.2, 0.5, 0.6], "outside \\[0, 1\\]"),
        ([0.5, 0.2, 0.1, 0.6], "x0 < x1"),
        ([0.1, 0.6, 0.5, 0.6], "y0 < y1"),
        ([0.1, math.nan, 0.5, 0.6], "not finite"),
        ([0.1, 0.2, math.inf, 0.6], "not finite"),
    ],
)
def test_bad_boxes_name_the_sample_and_object(box, message):
    boxes, masks, phrases = good()
    boxes[1, 3], masks[1, 3], phrases[1][3] = torch.tensor(box), 1, "a bird"
    with pytest.raises(GroundingInputError, match=f"sample 1 \\(img-b\\), object 3.*{message}"):
        check_box_grounding(boxes, masks, phrases, keys=["img-a", "img-b"])


def test_too_many_objects_and_length_mismatches():
    boxes, masks, phrases = good()
    with pytest.raises(GroundingInputError, match="more than max_objects=30"):
        check_box_grounding(torch.rand(2, 31, 4), torch.zeros(2, 31))
    with pytest.raises(GroundingInputError, match="masks shape"):
        check_box_grounding(boxes, masks[:, :29])
    with pytest.raises(GroundingInputError, match="1 phrase lists for a batch of 2"):
        check_box_grounding(boxes, masks, phrases[:1])
    with pytest.raises(GroundingInputError, match="sample 1: 29 phrases for 30 box slots"):
        check_box_grounding(boxes, masks, [phrases[0], phrases[1][:29]])
    with pytest.raises(GroundingInputError, match="boxes must be"):
        check_box_grounding(torch.rand(2, 30, 3), masks)
    phrases[0][0] = ""
    with pytest.raises(GroundingInputError, match="sample 0: object 0 has a box but an empty phrase"):
        check_box_grounding(boxes, masks, phrases)
    masks[1, 2] = 0.5
    with pytest.raises(GroundingInputError, match="sample 1: masks must be 0 or 1"):
        check_box_grounding(boxes, masks)
