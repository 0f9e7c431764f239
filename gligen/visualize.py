"""Drawing layouts on images (sample grids, the sampling CLI, TensorBoard)."""

import torch
from torchvision.utils import draw_bounding_boxes, make_grid

PALETTE = ["red", "lime", "blue", "yellow", "magenta", "cyan", "orange", "white"]


def draw_boxes(image: torch.Tensor, boxes: torch.Tensor, labels: list[str] | None = None,
               upscale: int = 1) -> torch.Tensor:
    """image [3, H, W] in [0, 1], boxes [N, 4] normalised xyxy -> uint8 [3, H*upscale, W*upscale] with boxes."""
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    if upscale > 1:  # tiny toy images: enlarge (nearest) so boxes and labels are readable
        pixels = pixels.repeat_interleave(upscale, 1).repeat_interleave(upscale, 2)
    if len(boxes) == 0:
        return pixels
    height, width = pixels.shape[1:]
    scaled = boxes.float() * torch.tensor([width, height, width, height])
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(boxes))]
    return draw_bounding_boxes(pixels, scaled, labels=labels, colors=colors, width=max(1, upscale // 2))


def layout_grid(images: torch.Tensor, boxes: torch.Tensor, masks: torch.Tensor,
                phrases: list[list[str]] | None = None, nrow: int = 8, upscale: int = 1) -> torch.Tensor:
    """A uint8 grid of images [B, 3, H, W] with each one's real (masked-in) boxes drawn."""
    drawn = []
    for i, image in enumerate(images):
        keep = masks[i].bool()
        labels = [p for p, k in zip(phrases[i], keep.tolist()) if k] if phrases is not None else None
        drawn.append(draw_boxes(image.cpu(), boxes[i][keep].cpu(), labels, upscale))
    return make_grid(torch.stack(drawn), nrow=nrow, padding=2)
