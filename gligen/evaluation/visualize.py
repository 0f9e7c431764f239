"""Drawing layouts on images (sample grids, the sampling CLI, TensorBoard): boxes with labels, and persons'
keypoints joined by the COCO skeleton (gligen.constants.SKELETON)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.utils import draw_bounding_boxes, make_grid

from gligen.constants import SKELETON

PALETTE = ["red", "lime", "blue", "yellow", "magenta", "cyan", "orange", "white"]


def _to_uint8(image: torch.Tensor, upscale: int) -> torch.Tensor:
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    if upscale > 1:  # tiny toy images: enlarge (nearest) so boxes and labels are readable
        pixels = pixels.repeat_interleave(upscale, 1).repeat_interleave(upscale, 2)
    return pixels


def draw_boxes(image: torch.Tensor, boxes: torch.Tensor, labels: list[str] | None = None,
               upscale: int = 1) -> torch.Tensor:
    """image [3, H, W] in [0, 1], boxes [N, 4] normalised xyxy -> uint8 [3, H*upscale, W*upscale] with boxes."""
    pixels = _to_uint8(image, upscale)
    return _boxes_on(pixels, boxes, labels, upscale)


def _boxes_on(pixels: torch.Tensor, boxes: torch.Tensor, labels: list[str] | None, upscale: int) -> torch.Tensor:
    if len(boxes) == 0:
        return pixels
    height, width = pixels.shape[1:]
    scaled = boxes.float() * torch.tensor([width, height, width, height])
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(boxes))]
    return draw_bounding_boxes(pixels, scaled, labels=labels, colors=colors, width=max(1, upscale // 2))


def draw_persons(pixels: torch.Tensor, persons, radius: int | None = None) -> torch.Tensor:
    """uint8 [3, H, W] with each person's present joints (v > 0; keypoints [P, 17, 3] normalised, or the schema's
    [{"keypoints": [[x, y, v] x 17]}]) drawn as dots joined by the skeleton; one colour per person."""
    if persons is None or len(persons) == 0:
        return pixels
    kps = np.array([p["keypoints"] if isinstance(p, dict) else p for p in persons], dtype=np.float64)
    kps = kps.reshape(-1, 17, 3)
    height, width = pixels.shape[1:]
    radius = radius if radius is not None else max(1, min(height, width) // 64)
    canvas = Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())
    draw = ImageDraw.Draw(canvas)
    for p, person in enumerate(kps):
        colour = PALETTE[p % len(PALETTE)]
        xy = person[:, :2] * np.array([width, height])
        present = person[:, 2] > 0
        for a, b in SKELETON:
            if present[a] and present[b]:
                draw.line([tuple(xy[a]), tuple(xy[b])], fill=colour, width=max(1, radius // 2))
        for k in np.nonzero(present)[0]:
            x, y = xy[k]
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour, outline="black")
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)


def draw_layout(image: torch.Tensor, boxes: torch.Tensor, labels: list[str] | None = None, persons=None,
                upscale: int = 1) -> torch.Tensor:
    """draw_boxes, then the persons' keypoints and skeletons (when given)."""
    return draw_persons(draw_boxes(image, boxes, labels, upscale), persons)


def layout_label(obj: dict) -> str:
    """A box's caption in a grid: its phrase, or "[image] <class>" for image-only entities."""
    if obj.get("phrase"):
        return str(obj["phrase"])
    return "[image] " + str(obj.get("entity_category") or obj.get("category") or "")


def layouts_grid(images, layouts: list[dict], nrow: int = 4, upscale: int | None = None) -> torch.Tensor:
    """uint8 [3, H, W] grid of images (uint8 HxWx3 arrays, or floats [B, 3, H, W] in [0, 1]) with every layout
    drawn whatever its modality: boxes with their labels, persons with keypoints and skeleton."""
    if isinstance(images, torch.Tensor):
        pixels = images.float()
    else:
        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    layouts = layouts[: len(pixels)]
    upscale = upscale or max(1, 128 // pixels.shape[-1])
    drawn = []
    for image, layout in zip(pixels, layouts):
        objects = layout.get("objects") or []
        boxes = torch.tensor([[float(v) for v in o["box"]] for o in objects], dtype=torch.float32).reshape(-1, 4)
        drawn.append(draw_layout(image, boxes, [layout_label(o) for o in objects], layout.get("persons"), upscale))
    return make_grid(torch.stack(drawn), nrow=nrow, padding=2)
