"""Grounding tokenizers (`position_net`): turn grounding inputs into grounding tokens h_e.

Box + phrase (paper eq. 5):  h_e = MLP([e_phrase, Fourier(box)]), with learned null features substituted for
padded objects instead of an attention mask, exactly as in the official code.
"""

import torch
from torch import nn

from gligen.constants import MAX_OBJECTS, MAX_PERSONS, NUM_KEYPOINTS
from gligen.nn.fourier import position_dim, position_features


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
        position_encoding: "fourier" (paper) or "raw" (the 4 box coordinates as they are; the paper's ablation).
    """

    def __init__(self, positive_len: int, out_dim: int, fourier_freqs: int = 8, position_encoding: str = "fourier"):
        super().__init__()
        self.positive_len = positive_len
        self.fourier_freqs = fourier_freqs
        self.position_encoding = position_encoding
        self.position_dim = position_dim(4, position_encoding, fourier_freqs)
        self.linears = _mlp(positive_len + self.position_dim, out_dim)
        self.null_positive_feature = nn.Parameter(torch.zeros(positive_len))
        self.null_position_feature = nn.Parameter(torch.zeros(self.position_dim))

    def forward(self, boxes: torch.Tensor, masks: torch.Tensor, positive_embeddings: torch.Tensor) -> torch.Tensor:
        """boxes [B, N, 4] normalised xyxy, masks [B, N] (1 = real object), positive_embeddings [B, N, positive_len]."""
        m = masks.unsqueeze(-1).to(positive_embeddings.dtype)
        position = position_features(boxes.to(positive_embeddings.dtype), self.position_encoding, self.fourier_freqs)
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


# ----- keypoints ------------------------------------------------------------------------------------------------


class KeypointTokenizer(nn.Module):
    """Keypoint grounding tokenizer: `max_persons` x 17 COCO joints -> 136 tokens (official keypoint position_net).

    Token (p, k) = MLP([person_embeddings[p] + keypoint_embeddings[k], Fourier(x, y)]), person-major order
    (token index p * 17 + k). Missing joints (mask 0) get `null_person_feature` and `null_xy_feature` instead.
    Official names: `person_embeddings`, `keypoint_embeddings`, `null_person_feature`, `null_xy_feature`,
    `linears.{0,2,4}`; everything learned, embeddings and nulls zero-initialised.

    Args:
        in_dim: width of the person / keypoint embeddings (official: the token width, 768 for SD-1.x).
        out_dim: grounding token width (the UNet's cross-attention width).
        max_persons: person slots (official 8).
        fourier_freqs: frequencies of the point Fourier embedding (8 -> 32 dims).
    """

    def __init__(self, in_dim: int, out_dim: int, max_persons: int = MAX_PERSONS, fourier_freqs: int = 8,
                 position_encoding: str = "fourier"):
        super().__init__()
        self.in_dim, self.max_persons, self.fourier_freqs = in_dim, max_persons, fourier_freqs
        self.position_encoding = position_encoding
        self.position_dim = position_dim(2, position_encoding, fourier_freqs)
        self.person_embeddings = nn.Parameter(torch.zeros(max_persons, in_dim))
        self.keypoint_embeddings = nn.Parameter(torch.zeros(NUM_KEYPOINTS, in_dim))
        self.linears = _mlp(in_dim + self.position_dim, out_dim)
        self.null_person_feature = nn.Parameter(torch.zeros(in_dim))
        self.null_xy_feature = nn.Parameter(torch.zeros(self.position_dim))

    @property
    def num_tokens(self) -> int:
        return self.max_persons * NUM_KEYPOINTS

    def forward(self, points: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """points [B, P, 17, 2] or [B, P*17, 2] normalised (x, y); masks [B, P, 17] or [B, P*17] (1 = present).

        Returns [B, P*17, out_dim] with P = max_persons.
        """
        batch = points.shape[0]
        points = points.reshape(batch, -1, 2)
        masks = masks.reshape(batch, -1)
        if points.shape[1] != self.num_tokens or masks.shape[1] != self.num_tokens:
            raise ValueError(
                f"expected {self.max_persons} persons x {NUM_KEYPOINTS} keypoints = {self.num_tokens} points, "
                f"got points {tuple(points.shape)} and masks {tuple(masks.shape)}"
            )
        dtype = self.person_embeddings.dtype
        m = masks.unsqueeze(-1).to(dtype)
        identity = (self.person_embeddings[:, None] + self.keypoint_embeddings[None]).reshape(self.num_tokens, -1)
        identity = identity * m + (1 - m) * self.null_person_feature  # broadcasts to [B, P*17, in_dim]
        position = position_features(points.to(dtype), self.position_encoding, self.fourier_freqs)
        position = position * m + (1 - m) * self.null_xy_feature
        return self.linears(torch.cat([identity, position], dim=-1))


def check_keypoint_grounding(
    points: torch.Tensor,
    masks: torch.Tensor,
    keys: list[str] | None = None,
    max_persons: int = MAX_PERSONS,
) -> None:
    """Raise `GroundingInputError` naming the sample if keypoint grounding input is malformed.

    Checks points [B, max_persons, 17, 2] (or [B, max_persons*17, 2]) with masks of the same layout in {0, 1},
    and for every present joint finite coordinates inside [0, 1]. Missing joints are not inspected.
    """
    num_tokens = max_persons * NUM_KEYPOINTS
    ok_shape = (points.ndim == 4 and tuple(points.shape[1:]) == (max_persons, NUM_KEYPOINTS, 2)) or (
        points.ndim == 3 and tuple(points.shape[1:]) == (num_tokens, 2)
    )
    if not ok_shape:
        raise GroundingInputError(
            f"keypoints must be [batch, {max_persons}, {NUM_KEYPOINTS}, 2] or [batch, {num_tokens}, 2], "
            f"got shape {tuple(points.shape)}"
        )
    if tuple(masks.shape) != tuple(points.shape[:-1]):
        raise GroundingInputError(
            f"keypoint_masks shape {tuple(masks.shape)} does not match keypoints {tuple(points.shape)}"
        )
    batch = points.shape[0]
    points = points.detach().float().reshape(batch, max_persons, NUM_KEYPOINTS, 2)
    masks = masks.detach().float().reshape(batch, max_persons, NUM_KEYPOINTS)

    def name(i: int) -> str:
        return f"sample {i}" + (f" ({keys[i]})" if keys is not None else "")

    bad_mask = ~((masks == 0) | (masks == 1))
    if bad_mask.any():
        i = int(bad_mask.flatten(1).any(dim=1).nonzero()[0])
        raise GroundingInputError(f"{name(i)}: keypoint_masks must be 0 or 1")
    problems = {
        "not finite": ~torch.isfinite(points).all(-1),
        "outside [0, 1] (keypoints are normalised xy)": (points < 0).any(-1) | (points > 1).any(-1),
    }
    for problem, bad in problems.items():
        bad = bad & masks.bool()
        if bad.any():
            i, p, k = (int(v) for v in bad.nonzero()[0])
            raise GroundingInputError(
                f"{name(i)}, person {p}, keypoint {k}, point {points[i, p, k].tolist()}: {problem}"
            )


# ----- text + image entities ------------------------------------------------------------------------------------
IMAGE_FEATURE_NORM = 28.7  # official norm of the image entity feature in text-feature space


class TextImageBoxTokenizer(nn.Module):
    """Box + phrase + image-entity tokenizer, diffusers' GLIGENTextBoundingboxProjection(feature_type="text-image").

    Each box slot gives a text token MLP_text([e_text, Fourier(box)]) and an image token
    MLP_image([e_image, Fourier(box)]); output is the N text tokens followed by the N image tokens. Padded boxes
    get `null_position_feature`; a masked text / image feature gets `null_text_feature` / `null_image_feature`.
    Official names: `linears_text`, `linears_image`, `null_text_feature`, `null_image_feature`,
    `null_position_feature`.

    Args:
        in_dim: feature width of both entities (the CLIP pooled text width; image features are projected there,
            see `project_image_embeddings`).
        out_dim: grounding token width.
    """

    def __init__(self, in_dim: int, out_dim: int, fourier_freqs: int = 8, position_encoding: str = "fourier"):
        super().__init__()
        self.in_dim, self.fourier_freqs = in_dim, fourier_freqs
        self.position_encoding = position_encoding
        self.position_dim = position_dim(4, position_encoding, fourier_freqs)
        self.linears_text = _mlp(in_dim + self.position_dim, out_dim)
        self.linears_image = _mlp(in_dim + self.position_dim, out_dim)
        self.null_text_feature = nn.Parameter(torch.zeros(in_dim))
        self.null_image_feature = nn.Parameter(torch.zeros(in_dim))
        self.null_position_feature = nn.Parameter(torch.zeros(self.position_dim))

    def forward(
        self,
        boxes: torch.Tensor,
        masks: torch.Tensor,
        phrases_masks: torch.Tensor,
        image_masks: torch.Tensor,
        phrases_embeddings: torch.Tensor,
        image_embeddings: torch.Tensor,
    ) -> torch.Tensor:
        """boxes [B, N, 4]; masks, phrases_masks, image_masks [B, N]; embeddings [B, N, in_dim] -> [B, 2N, out]."""
        dtype = phrases_embeddings.dtype

        def substitute(x, mask, null):
            m = mask.unsqueeze(-1).to(dtype)
            return x * m + (1 - m) * null

        position = substitute(position_features(boxes.to(dtype), self.position_encoding, self.fourier_freqs), masks,
                              self.null_position_feature)
        text = substitute(phrases_embeddings, phrases_masks, self.null_text_feature)
        image = substitute(image_embeddings.to(dtype), image_masks, self.null_image_feature)
        text_tokens = self.linears_text(torch.cat([text, position], dim=-1))
        image_tokens = self.linears_image(torch.cat([image, position], dim=-1))
        return torch.cat([text_tokens, image_tokens], dim=1)


def project_image_embeddings(
    image_embeds: torch.Tensor, text_projection_weight: torch.Tensor, norm: float = IMAGE_FEATURE_NORM
) -> torch.Tensor:
    """CLIP image embeddings [..., proj_dim] (after the visual projection) -> text-feature space [..., text_dim].

    Multiplies by the transpose of the text projection (`CLIPModel.text_projection.weight`, [proj_dim, text_dim],
    which maps text features t to t @ W^T; its transpose maps i to i @ W), renormalises to unit length and scales
    to `norm` (official 28.7, about the norm of CLIP ViT-L pooled text features). The input's own scale does not
    matter, so projected embeddings need not be unit-normalised first.
    """
    features = image_embeds.float() @ text_projection_weight.float()
    return features / features.norm(dim=-1, keepdim=True) * norm


def text_or_image_drop(
    masks: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-time entity dropout (official `random_drop_embedding="both"`).

    For every valid box (mask 1), with probability `p` drop either its text or its image feature (each with
    probability 1/2), never both; otherwise keep both. Padded boxes stay 0 in both. Returns
    (phrases_masks, image_masks), same shape and dtype as `masks`.
    """
    drop = torch.rand(masks.shape, generator=generator, device=masks.device) < p
    drop_text = torch.rand(masks.shape, generator=generator, device=masks.device) < 0.5
    keep_text = ~(drop & drop_text)
    keep_image = ~(drop & ~drop_text)
    return masks * keep_text.to(masks.dtype), masks * keep_image.to(masks.dtype)
