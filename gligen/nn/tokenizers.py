"""Grounding tokenizers (`position_net`): turn grounding inputs into grounding tokens h_e.

Box + phrase (paper eq. 5):  h_e = MLP([e_phrase, Fourier(box)]), with learned null features substituted for
padded objects instead of an attention mask, exactly as in the official code.
"""

import torch
from torch import nn

from .fourier import fourier_dim, fourier_embed

MAX_OBJECTS = 30


class GroundingInputError(ValueError):
    """Grounding input that cannot be right (the message names the sample and the problem)."""


def _mlp(in_dim: int, out_dim: int, hidden: int = 512) -> nn.Sequential:
    # official layout: keys linears.{0,2,4}
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, out_dim)
    )


class TextBoxTokenizer(nn.Module):
    """Box + phrase grounding tokenizer, official names `linears`, `null_positive_feature`, `null_position_feature`.

    Args:
        positive_len: phrase feature width (CLIP pooled text feature; 768 for SD-1.x).
        out_dim: grounding token width (the UNet's cross-attention width).
        fourier_freqs: frequencies of the box Fourier embedding (8 -> 64 dims).
    """

    def __init__(self, positive_len: int, out_dim: int, fourier_freqs: int = 8):
        super().__init__()
        self.positive_len = positive_len
        self.fourier_freqs = fourier_freqs
        self.position_dim = fourier_dim(4, fourier_freqs)
        self.linears = _mlp(positive_len + self.position_dim, out_dim)
        self.null_positive_feature = nn.Parameter(torch.zeros(positive_len))
        self.null_position_feature = nn.Parameter(torch.zeros(self.position_dim))

    def forward(self, boxes: torch.Tensor, masks: torch.Tensor, positive_embeddings: torch.Tensor) -> torch.Tensor:
        """boxes [B, N, 4] normalised xyxy, masks [B, N] (1 = real object), positive_embeddings [B, N, positive_len]."""
        m = masks.unsqueeze(-1).to(positive_embeddings.dtype)
        position = fourier_embed(boxes.to(positive_embeddings.dtype), self.fourier_freqs)
        position = position * m + (1 - m) * self.null_position_feature
        positive = positive_embeddings * m + (1 - m) * self.null_positive_feature
        return self.linears(torch.cat([positive, position], dim=-1))


def check_box_grounding(
    boxes: torch.Tensor,
    masks: torch.Tensor,
    phrases: list | None = None,
    keys: list[str] | None = None,
    max_objects: int = MAX_OBJECTS,
) -> None:
    """Raise `GroundingInputError` naming the sample if box grounding input is malformed.

    Checks shapes and lengths, at most `max_objects`, masks in {0, 1}, and for every real object a finite box
    inside [0, 1] with x0 < x1 and y0 < y1. Padded entries are not inspected (they are replaced by null features).
    """
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise GroundingInputError(f"boxes must be [batch, objects, 4], got shape {tuple(boxes.shape)}")
    batch, num_objects = boxes.shape[:2]
    if num_objects > max_objects:
        raise GroundingInputError(f"{num_objects} object slots, more than max_objects={max_objects}")
    if tuple(masks.shape) != (batch, num_objects):
        raise GroundingInputError(f"masks shape {tuple(masks.shape)} does not match boxes {tuple(boxes.shape)}")
    if phrases is not None and len(phrases) != batch:
        raise GroundingInputError(f"{len(phrases)} phrase lists for a batch of {batch}")
    boxes, masks = boxes.detach().float(), masks.detach().float()

    def name(i: int) -> str:
        return f"sample {i}" + (f" ({keys[i]})" if keys is not None else "")

    bad_mask = ~((masks == 0) | (masks == 1))
    if bad_mask.any():
        i = int(bad_mask.any(dim=1).nonzero()[0])
        raise GroundingInputError(f"{name(i)}: masks must be 0 or 1, got {masks[i].tolist()}")
    if phrases is not None:
        for i, sample_phrases in enumerate(phrases):
            if len(sample_phrases) != num_objects:
                raise GroundingInputError(f"{name(i)}: {len(sample_phrases)} phrases for {num_objects} box slots")
            for j in masks[i].nonzero().flatten().tolist():
                if not sample_phrases[j]:
                    raise GroundingInputError(f"{name(i)}: object {j} has a box but an empty phrase")
    # vectorised checks first; the slow path below only runs to name the first offender
    x0, y0, x1, y1 = boxes.unbind(-1)
    problems = {
        "not finite": ~torch.isfinite(boxes).all(-1),
        "outside [0, 1] (boxes are normalised xyxy)": (boxes < 0).any(-1) | (boxes > 1).any(-1),
        "needs x0 < x1 and y0 < y1": ~((x0 < x1) & (y0 < y1)),
    }
    for problem, bad in problems.items():
        bad = bad & masks.bool()
        if bad.any():
            i, j = (int(v) for v in bad.nonzero()[0])
            raise GroundingInputError(f"{name(i)}, object {j}, box {boxes[i, j].tolist()}: {problem}")
