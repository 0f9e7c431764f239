import math

import torch
from diffusers.models.embeddings import get_fourier_embeds_from_boundingbox

from gligen.nn.fourier import fourier_dim, fourier_embed


def test_fourier_matches_formula_on_hand_computed_values():
    # two frequencies with temperature 100: f = 100 ** (k / 2) = 1, 10
    out = fourier_embed(torch.tensor([[0.5, 0.25]]), num_freqs=2, temperature=100)
    expected = [
        math.sin(0.5), math.sin(0.25), math.cos(0.5), math.cos(0.25),  # f0 = 1
        math.sin(5.0), math.sin(2.5), math.cos(5.0), math.cos(2.5),  # f1 = 10
    ]
    assert torch.allclose(out[0], torch.tensor(expected), atol=1e-6)


def test_fourier_widths_box_and_point():
    assert fourier_embed(torch.rand(2, 30, 4)).shape == (2, 30, 64) == (2, 30, fourier_dim(4))
    assert fourier_embed(torch.rand(3, 136, 2)).shape == (3, 136, 32) == (3, 136, fourier_dim(2))


def test_fourier_box_layout_matches_diffusers():
    boxes = torch.rand(2, 5, 4, dtype=torch.float64)
    ours = fourier_embed(boxes, num_freqs=8)
    reference = get_fourier_embeds_from_boundingbox(8, boxes)
    assert torch.allclose(ours, reference, atol=1e-5)  # diffusers computes its frequencies in float32
