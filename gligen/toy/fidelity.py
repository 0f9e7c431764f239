"""Image quality and background style of toy images, read back exactly from pixels (the toy world's quality measure).

- `read_style`: the background pattern of a styled scene (gligen.toy.world.STYLES), exact on real images.
- `fidelity_error`: the fraction of pixels keeping an image from being a valid toy object scene (off-colour pixels,
  stray blobs, broken shapes); exactly 0 on every real image, growing with noise, blur, colour shifts and malformed
  objects. `python -m gligen.toy evaluate` checks that it orders real < VAE reconstructions < base samples < damaged
  images (gligen.toy.report).
- `ToyImageScorer` ("toy_image" in gligen.metrics.detectors): both, per image, for every sweep row.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_dilation

from gligen.metrics.grounding import as_rgb
from gligen.toy.evaluate import COLOUR_DISTANCE, EIGHT, MIN_OBJECT_FRACTION, _components, nearest_colour_map
from gligen.toy.world import (
    COLOURS,
    PALETTE,
    STYLE_GREY,
    STYLES,
    caption_style,
    match_shape,
    shape_mask,
    style_mask,
    style_period,
    tight_box,
)


def _background_grey(image: np.ndarray, colour_distance: float = COLOUR_DISTANCE) -> tuple[np.ndarray, np.ndarray]:
    """Grey level [H, W] (channel mean) and the background mask: pixels far from every palette colour, with the
    objects' one-pixel rims (VAE blur) left out too."""
    palette = np.array([PALETTE[c] for c in COLOURS])
    index, _ = nearest_colour_map(image, palette, colour_distance)
    background = ~binary_dilation(index >= 0, structure=EIGHT)
    return image.astype(np.float64).mean(-1), background


def style_fits(image, background_grey: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, float]:
    """Per style of STYLES: R^2 of the best least-squares fit grey = a * pattern + b (a > 0) over the background,
    best over the pattern's phase shifts. 1.0 for the drawn style on a real image. `background_grey`: the image's
    `_background_grey`, when the caller has it."""
    image = as_rgb(image)
    grey, background = background_grey or _background_grey(image)
    values = grey[background]
    total = float(((values - values.mean()) ** 2).sum()) if values.size else 0.0
    fits = {}
    period = style_period(image.shape[0])
    for style in STYLES:
        best = 0.0
        for dx in range(period):
            for dy in range(period):
                pattern = style_mask(style, image.shape[0], (dx, dy))[background].astype(np.float64)
                if total <= 0 or pattern.std() == 0:
                    continue
                centred = pattern - pattern.mean()
                slope = float(centred @ (values - values.mean())) / float(centred @ centred)
                if slope > 0:
                    best = max(best, slope ** 2 * float(centred @ centred) / total)
        fits[style] = best
    return fits


def read_style(image, min_fit: float = 0.5, min_contrast: float = STYLE_GREY / 2) -> str | None:
    """The background style of an image: the best-fitting pattern of STYLES when it explains at least `min_fit`
    of the background's variance with a contrast of at least `min_contrast` grey levels; "plain" for a flat dark
    background; None when neither (an unreadable background)."""
    image = as_rgb(image)
    grey, background = _background_grey(image)
    fits = style_fits(image, (grey, background))
    style = max(fits, key=fits.get)
    if fits[style] >= min_fit and grey[background].std() * 2 >= min_contrast:
        return style
    return "plain" if background.any() and grey[background].mean() < min_contrast / 2 else None


# A generated pixel is clean when it is within CLEAN_DISTANCE of a colour a toy image can hold (background black,
# the style grey, a palette colour); the real images are exactly these colours.
CLEAN_DISTANCE = 48.0


def fidelity_error(image, min_fraction: float = MIN_OBJECT_FRACTION) -> float:
    """The fraction of pixels that keep the image from being a valid toy object scene: off-colour pixels (no toy
    colour within CLEAN_DISTANCE), stray pixels (palette-coloured components below an object's size), and broken
    shapes (pixels of a component outside its best template, and template pixels missing without an object of
    another colour on top). 0 on every real object or styled scene; grows with noise, blur, colour shifts and
    malformed objects."""
    image = as_rgb(image)
    h, w = image.shape[:2]
    clean = np.array([(0, 0, 0), (STYLE_GREY,) * 3] + [PALETTE[c] for c in COLOURS])
    _, distance = nearest_colour_map(image, clean, np.inf)
    wrong = distance > CLEAN_DISTANCE
    palette = np.array([PALETTE[c] for c in COLOURS])
    index, _ = nearest_colour_map(image, palette, COLOUR_DISTANCE)
    min_pixels = max(2, round(min_fraction * h * w))
    for ci in range(len(COLOURS)):
        for comp in _components(index == ci):
            if comp.sum() < min_pixels:
                wrong |= comp
                continue
            x0, y0, x1, y1 = tight_box(comp)
            shape, _ = match_shape(comp[y0:y1, x0:x1])
            template = np.zeros_like(comp)
            template[y0:y1, x0:x1] = shape_mask(shape, y1 - y0, x1 - x0)
            covered = (index >= 0) & (index != ci)  # an object of another colour on top
            wrong |= (comp & ~template) | (template & ~comp & ~covered)
    return float(wrong.mean())


class ToyImageScorer:
    """Per-image scores of generated toy images against their layouts (registered as "toy_image" in
    gligen.metrics.detectors): `fidelity_error` (object layouts; None for person layouts) and `style_adherence`
    (1 when the background style read back is the one the caption asks for; None when it asks for none)."""

    def __call__(self, images: list[np.ndarray], layouts: list[dict]) -> dict[str, list[float | None]]:
        fidelity, adherence = [], []
        for image, layout in zip(images, layouts):
            fidelity.append(None if layout.get("persons") else fidelity_error(image))
            asked = caption_style(layout.get("caption") or "")
            adherence.append(None if asked is None else float(read_style(image) == asked))
        return {"fidelity_error": fidelity, "style_adherence": adherence}
