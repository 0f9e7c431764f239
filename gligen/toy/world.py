"""The toy world: synthetic grounded scenes whose ground truth can be read back exactly from pixels.

One file on purpose: the world's rules (palette, shapes, placement, persons, captions, the sample generator)
read top to bottom, and WORLD_VERSION versions all of them together.

Three scene families:
- "objects": 1-2 solid coloured shapes (4 shapes x 6 colours) on a black (optionally lightly textured) background.
  Default resolution 32. Each object keeps its full extent visible (occluders may only bite into its interior,
  at most 15% of its pixels), so its tight box and its shape are recoverable from the image alone.
- "persons": one stick figure carrying the 17 COCO keypoints, each joint a square blob (3 px at 32, scaled with
  resolution) in its own colour on grey limbs, under a compact head. Joints of that size survive the toy VAE
  (1-px joints did not: PCK 0.000 on reconstructions), and read-back is exact (gligen.toy.evaluate.evaluate_keypoints:
  PCK 1.0 and OKS AP 1.0 on real scenes). The toy build writes them at the toy resolution (32) for one LDM.
- "styled": object scenes on a background pattern named in the caption ("... on a striped background"; STYLES:
  striped, checkered, dotted, dark grey on black, read back exactly by gligen.toy.fidelity.read_style). They are
  knowledge only the base has: the base LDM pretrains on them, GLIGEN's grounding shards never hold them, so
  grounding at every step (scheduled sampling's tau = 1) can pull a style away that a smaller tau keeps.

Shapes are rasterised with numpy from integer pixel boxes (not PIL drawing), because the evaluator matches
components against exactly the same templates (``shape_mask``), which keeps read-back exact on clean images.
PIL draws the stick-figure limbs and encodes PNGs. Everything is a function of a numpy Generator, and every
sample of a split is a function of (seed, split, family, kind, index) only, so shards can be written in any order.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import binary_dilation, label

from gligen.constants import SKELETON
from gligen.data.schema import KINDS, SCHEMA_VERSION
from gligen.data.shards import write_shards

FAMILIES = ("objects", "persons", "styled")  # new families go last: a sample's stream depends on the index
SPLITS = ("train", "val", "test", "ood")

DEFAULT_RESOLUTION = 32
# Bumped whenever a sample's pixels or annotation change, so a cache written by older code is refused, not reused.
# 2: person scenes hold one figure with 3-px joints and a compact head (1: 1-2 figures, 1-px joints at 32 px).
# 3: object scenes hold 1-2 objects of sides 0.4-0.75 (2: 1-4 of 0.25-0.6, whose shapes the toy base drew at chance:
#    results/toy_next/README.md), and the styled family is part of the default world.
WORLD_VERSION = 3

# Saturated colours, pairwise >= 255 apart in RGB, all >= 255 from black: nearest-colour read-back is exact.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
COLOURS = tuple(PALETTE)
# Fill ratios 1.0 / 0.79 / 0.5 / 0.56 and different geometry: pairwise template IoU <= ~0.8 (see shape_mask).
SHAPES = ("square", "circle", "triangle", "cross")
CATEGORIES = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)  # category index = label for AP

# Held-out colour-shape pairs: never drawn in train/val/test, the only pairs drawn in "ood".
# Each colour and each shape still appears in training with other partners.
HELD_OUT_PAIRS = (("red", "cross"), ("green", "circle"), ("blue", "triangle"), ("yellow", "square"))
SEEN_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT_PAIRS)

SPLIT_IDS = {split: i for i, split in enumerate(SPLITS)}

# Background styles of the "styled" family: a dark grey pattern of period STYLE_PERIOD x resolution (8 px at 32: its
# 4-px features fill whole 4-px latent cells of the toy VAE; at a 4-px period, checks and dots of 2 px came back from
# the VAE as flat grey, measured: style read back from 25% of reconstructions). Grey 64 is > COLOUR_DISTANCE
# (gligen.toy.evaluate) from black and from every palette colour, so object read-back ignores it; the three patterns
# are pairwise uncorrelated or nearly (striped vs dotted: R^2 0.33), so the best-fitting one names the style exactly
# on real images.
STYLES = ("striped", "checkered", "dotted")
STYLE_GREY = 64
STYLE_PERIOD = 1 / 4

# Object geometry (fractions of the image side) and occlusion limits.
# Objects of 13-24 px at 32 (a shape over 3-6 latent cells of the 8 x 8 toy latent), at most 2 a scene: at sides
# 0.25-0.6 and up to 4 objects the pretrained base drew the named shape at chance (world version 2).
MIN_OBJECT_SIDE, MAX_OBJECT_SIDE = 0.4, 0.75
MAX_ASPECT = 1.5
MAX_OBJECTS = 2


@dataclass(frozen=True)
class ObjectGeometry:
    """How large object-scene objects are (box sides as fractions of the image side) and how many a scene holds at
    most. A world parameter (ToyBuildConfig.object_geometry), because the base LDM's ability to draw the named
    shapes depends on it: a shape spread over more latent cells is more of the denoising loss."""

    min_side: float = MIN_OBJECT_SIDE
    max_side: float = MAX_OBJECT_SIDE
    max_objects: int = MAX_OBJECTS

    def __post_init__(self):
        if not 0 < self.min_side <= self.max_side <= 1 or self.max_objects < 1:
            raise ValueError(f"object geometry needs 0 < min_side <= max_side <= 1 and max_objects >= 1, got {self}")


DEFAULT_GEOMETRY = ObjectGeometry()
MIN_VISIBLE_FRACTION = 0.85
PLACEMENT_TRIES = 60

# One colour per joint from the {0, 128, 255}^3 grid, each with a 255 channel (bright, far from black and from the
# grey limbs); grid colours are >= 127 apart, so the nearest-colour rule separates them. Neighbouring joints
# get colours that differ in at least two channels where possible.
KEYPOINT_COLOURS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0),      # nose
    (0, 255, 0),      # left_eye
    (0, 0, 255),      # right_eye
    (255, 0, 255),    # left_ear
    (0, 255, 255),    # right_ear
    (255, 255, 0),    # left_shoulder
    (128, 0, 255),    # right_shoulder
    (0, 128, 255),    # left_elbow
    (255, 128, 0),    # right_elbow
    (255, 0, 128),    # left_wrist
    (128, 255, 0),    # right_wrist
    (0, 255, 128),    # left_hip
    (255, 128, 255),  # right_hip
    (128, 255, 255),  # left_knee
    (255, 255, 128),  # right_knee
    (255, 128, 128),  # left_ankle
    (128, 255, 128),  # right_ankle
)
LIMB_COLOUR = (128, 128, 128)


# ----------------------------------------------------------------------------------------------------- shapes


def shape_mask(shape: str, height: int, width: int) -> np.ndarray:
    """Boolean [height, width] raster of `shape` filling its box; touches all four sides for any size >= 1.

    Tests are made at pixel centres with a half-pixel tolerance where a shape narrows to a point, so the tight box of
    the raster is always the full box (the annotated box is then exactly what read-back sees).
    """
    y, x = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    u, v = x / width, y / height  # pixel centres in [0, 1]
    half_px_u = 0.5 / width
    if shape == "square":
        return np.ones((height, width), dtype=bool)
    if shape == "circle":
        return ((u - 0.5) ** 2 / 0.25 + (v - 0.5) ** 2 / 0.25) <= 1.0 + 1e-9
    if shape == "triangle":  # apex at top centre, base along the bottom; width taken at each row's lower edge
        return np.abs(u - 0.5) <= (v + 0.5 / height) / 2 + half_px_u + 1e-9
    if shape == "cross":  # plus sign, arms one third of the box wide
        arm_u = max(1 / 6, half_px_u) + 1e-9
        arm_v = max(1 / 6, 0.5 / height) + 1e-9
        return (np.abs(u - 0.5) <= arm_u) | (np.abs(v - 0.5) <= arm_v)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def match_shape(mask: np.ndarray) -> tuple[str, float]:
    """Classify a component mask cropped to its tight box: the shape whose template (same box) overlaps best.

    Lives next to ``shape_mask`` because the vocabulary is defined by what this rule can tell apart; the scene
    generator uses it to reject occlusions that would change an object's apparent shape.
    """
    h, w = mask.shape
    ious = [mask_iou(mask, shape_mask(s, h, w)) for s in SHAPES]
    best = int(np.argmax(ious))
    return SHAPES[best], ious[best]


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Pixel box [x0, y0, x1, y1) (exclusive end) of the True pixels, or None when empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


# ----------------------------------------------------------------------------------------------------- scenes


@dataclass
class SceneObject:
    shape: str
    colour: str
    box: tuple[int, int, int, int]  # pixel xyxy, exclusive end; the shape touches all four sides

    @property
    def category(self) -> str:
        return f"{self.colour} {self.shape}"

    def mask(self, resolution: int) -> np.ndarray:
        x0, y0, x1, y1 = self.box
        full = np.zeros((resolution, resolution), dtype=bool)
        full[y0:y1, x0:x1] = shape_mask(self.shape, y1 - y0, x1 - x0)
        return full


@dataclass
class Person:
    joints: np.ndarray  # int [17, 2]: top-left pixel (x, y) of each joint's blob
    blob: int  # blob side in pixels
    head_centre: tuple[float, float]
    head_radius: float

    def keypoints_px(self) -> np.ndarray:
        """Continuous pixel coordinates of each blob's centre (= centroid of its pixels)."""
        return self.joints.astype(np.float64) + self.blob / 2


@dataclass
class Scene:
    resolution: int
    objects: list[SceneObject] = field(default_factory=list)
    persons: list[Person] = field(default_factory=list)
    background_texture: float = 0.0  # amplitude (grey levels) of a smooth background texture; 0 = plain black
    background_seed: int = 0
    style: str | None = None  # a background pattern of STYLES (the "styled" family); None = no pattern


def sample_box(rng: np.random.Generator, resolution: int,
                geometry: ObjectGeometry = DEFAULT_GEOMETRY) -> tuple[int, int, int, int]:
    lo, hi = round(geometry.min_side * resolution), round(geometry.max_side * resolution)
    while True:
        w, h = (int(s) for s in rng.integers(lo, hi + 1, size=2))
        if max(w, h) <= MAX_ASPECT * min(w, h):
            break
    x0 = int(rng.integers(0, resolution - w + 1))
    y0 = int(rng.integers(0, resolution - h + 1))
    return x0, y0, x0 + w, y0 + h


def _dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    return binary_dilation(mask, structure=np.ones((3, 3), bool), iterations=pixels) if pixels > 0 else mask


def _stays_readable(obj: SceneObject, covered: np.ndarray, resolution: int) -> bool:
    """An object partly covered by later ones must keep its tight box, its shape, one component and 85% of pixels."""
    full = obj.mask(resolution)
    visible = full & ~covered
    if visible.sum() < MIN_VISIBLE_FRACTION * full.sum() or tight_box(visible) != obj.box:
        return False
    if label(visible, structure=np.ones((3, 3), bool))[1] != 1:
        return False
    x0, y0, x1, y1 = obj.box
    return match_shape(visible[y0:y1, x0:x1])[0] == obj.shape


def _placement_ok(objects: list[SceneObject], new: SceneObject, resolution: int) -> bool:
    new_mask = new.mask(resolution)
    for i, old in enumerate(objects):
        # Same-colour objects must not touch, or they would read back as one component.
        if old.colour == new.colour and (_dilate(old.mask(resolution), 1) & new_mask).any():
            return False
        covered = new_mask.copy()
        for later in objects[i + 1:]:
            covered |= later.mask(resolution)
        if covered.any() and not _stays_readable(old, covered, resolution):
            return False
    return True


def sample_object_scene(rng: np.random.Generator, resolution: int = DEFAULT_RESOLUTION,
                        pairs: tuple[tuple[str, str], ...] = SEEN_PAIRS, background_texture: float = 0.0,
                        geometry: ObjectGeometry = DEFAULT_GEOMETRY) -> Scene:
    """1..geometry.max_objects objects drawn from `pairs`; an object that finds no readable place is dropped."""
    n = int(rng.integers(1, geometry.max_objects + 1))
    objects: list[SceneObject] = []
    for _ in range(n):
        colour, shape = pairs[int(rng.integers(len(pairs)))]
        for _ in range(PLACEMENT_TRIES):
            candidate = SceneObject(shape=shape, colour=colour, box=sample_box(rng, resolution, geometry))
            if _placement_ok(objects, candidate, resolution):
                objects.append(candidate)
                break
    return Scene(resolution=resolution, objects=objects, background_texture=background_texture,
                 background_seed=int(rng.integers(2**31)))


# ---------------------------------------------------------------------------------------------------- persons


def keypoint_blob_size(resolution: int) -> int:
    """Joint blob side: 3 px at 32, scaled with resolution. Smaller blobs do not survive the toy's factor-4 VAE
    (8x8 latents at 32 px): reconstructed real scenes read back with PCK 0.000 with 1-px joints, 0.99 with 3-px ones
    (README, "Modalities"); a probe at 64 px (16x16 latents) gave 0.148 for 2-px joints, 0.92 for 3-px."""
    return max(1, 3 * resolution // 32)


def _face_offsets(blob: int) -> np.ndarray:
    """Centre offsets of nose, eyes, ears from the head centre, in pixels; person's left = image right (frontal)."""
    b = blob
    return np.array([
        (0.0, 1.0 * b),                        # nose
        (1.0 * b, -1.0 * b), (-1.0 * b, -1.0 * b),  # left_eye, right_eye
        (2.0 * b, 0.0), (-2.0 * b, 0.0),       # left_ear, right_ear
    ])


def _polar(origin: np.ndarray, length: float, angle_deg: float) -> np.ndarray:
    """Point at `length` from origin; angle 0 = straight down, positive = towards image right."""
    a = np.deg2rad(angle_deg)
    return origin + length * np.array([np.sin(a), np.cos(a)])


def _sample_pose(rng: np.random.Generator, centre_x: float, top: float, height: float, blob: int) -> Person:
    """A frontal stick figure `height` px tall (head top to ankles) with random arm and leg angles."""
    head_r = 2.0 * blob  # compact head: the five face blobs just fit inside, so the body keeps most of `height`
    head = np.array([centre_x, top + head_r])
    neck = head + [0, head_r + 0.04 * height]
    shoulder_half = height * rng.uniform(0.13, 0.18)
    hip_y = top + 2 * head_r + 0.42 * (height - 2 * head_r)
    hip_half = height * rng.uniform(0.07, 0.1)
    leg = (top + height - hip_y) / 2 / np.cos(np.deg2rad(12))
    pts = np.zeros((17, 2))
    pts[0:5] = head + _face_offsets(blob)
    for side, sign in ((0, 1), (1, -1)):  # 0: left (image right), 1: right (image left)
        shoulder = neck + [sign * shoulder_half, 0.02 * height]
        elbow = _polar(shoulder, 0.2 * height, sign * rng.uniform(15, 140))
        wrist = _polar(elbow, 0.18 * height, sign * rng.uniform(-10, 170))
        hip = np.array([centre_x + sign * hip_half, hip_y])
        knee = _polar(hip, leg, sign * rng.uniform(0, 25))
        ankle = _polar(knee, leg, sign * rng.uniform(-10, 15))
        for k, p in zip((5, 7, 9, 11, 13, 15), (shoulder, elbow, wrist, hip, knee, ankle)):
            pts[k + side] = p
    joints = np.floor(pts - blob / 2 + 0.5).astype(np.int64)
    return Person(joints=joints, blob=blob, head_centre=(float(head[0]), float(head[1])), head_radius=head_r)


def _blob_masks(person: Person, resolution: int) -> list[np.ndarray]:
    masks = []
    for x, y in person.joints:
        m = np.zeros((resolution, resolution), dtype=bool)
        m[max(y, 0):max(y + person.blob, 0), max(x, 0):max(x + person.blob, 0)] = True
        masks.append(m)
    return masks


def _person_readable(person: Person, resolution: int) -> bool:
    """All blobs inside the image, full-sized and pairwise disjoint (else a centroid would move)."""
    j, b = person.joints, person.blob
    if j.min() < 0 or (j + b).max() > resolution:
        return False
    union = np.zeros((resolution, resolution), dtype=np.int32)
    for m in _blob_masks(person, resolution):
        union += m
    return int(union.max()) == 1


def sample_person_scene(rng: np.random.Generator, resolution: int = DEFAULT_RESOLUTION,
                        background_texture: float = 0.0) -> Scene:
    """One stick figure 60-90% of the image tall. With joints big enough to survive the VAE (3 px at 32) a second
    figure no longer fits beside the first, so a scene holds one (the read-back still splits several)."""
    blob = keypoint_blob_size(resolution)
    for _ in range(50 * PLACEMENT_TRIES):
        height = resolution * rng.uniform(0.6, 0.9)
        person = _sample_pose(rng, centre_x=resolution * rng.uniform(0.2, 0.8), top=rng.uniform(0, resolution - height),
                              height=height, blob=blob)
        if _person_readable(person, resolution):
            return Scene(resolution=resolution, persons=[person], background_texture=background_texture,
                         background_seed=int(rng.integers(2**31)))
    raise ValueError(f"no readable stick figure fits at resolution {resolution}; use >= 32")


# -------------------------------------------------------------------------------------------------- rendering


def style_period(resolution: int) -> int:
    return max(2, round(resolution * STYLE_PERIOD))


def style_mask(style: str, resolution: int, shift: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Boolean [resolution, resolution]: where the pattern of `style` is grey (shifted by (dx, dy) pixels)."""
    period = style_period(resolution)
    half = period // 2
    y, x = np.mgrid[0:resolution, 0:resolution]
    x, y = (x + shift[0]) % period, (y + shift[1]) % period
    if style == "striped":  # vertical stripes half a period wide
        return x < half
    if style == "checkered":
        return (x < half) ^ (y < half)
    if style == "dotted":  # squares a quarter of the cell
        return (x < half) & (y < half)
    raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")


def _background(scene: Scene) -> np.ndarray:
    r = scene.resolution
    if scene.style is not None:
        image = np.zeros((r, r, 3), dtype=np.uint8)
        image[style_mask(scene.style, r)] = STYLE_GREY
        return image
    if scene.background_texture <= 0:
        return np.zeros((r, r, 3), dtype=np.uint8)
    # Smooth grey texture: a 4x4 random field upsampled bilinearly, amplitude well below any palette distance.
    rng = np.random.default_rng(scene.background_seed)
    coarse = rng.uniform(0, scene.background_texture, (4, 4)).astype(np.float32)
    smooth = np.asarray(Image.fromarray(coarse, mode="F").resize((r, r), Image.BILINEAR))
    return np.repeat(np.clip(smooth, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)


def _draw_person_limbs(draw: ImageDraw.ImageDraw, person: Person, width: int) -> None:
    kp = person.keypoints_px()
    hx, hy, r = person.head_centre[0], person.head_centre[1], person.head_radius
    draw.ellipse([hx - r, hy - r, hx + r, hy + r], fill=LIMB_COLOUR)
    neck_bottom = (kp[5] + kp[6]) / 2
    draw.line([(hx, hy + r), tuple(neck_bottom)], fill=LIMB_COLOUR, width=width)
    for a, b in SKELETON:
        draw.line([tuple(kp[a]), tuple(kp[b])], fill=LIMB_COLOUR, width=width)


def render_scene(scene: Scene) -> np.ndarray:
    """uint8 [H, W, 3]. Objects are painted in list order (later on top); persons: all limbs, then all blobs."""
    image = _background(scene)
    for obj in scene.objects:
        image[obj.mask(scene.resolution)] = PALETTE[obj.colour]
    if scene.persons:
        canvas = Image.fromarray(image)
        draw = ImageDraw.Draw(canvas)
        for person in scene.persons:
            _draw_person_limbs(draw, person, width=max(1, person.blob // 2))
        image = np.array(canvas)
        for person in scene.persons:
            for k, m in enumerate(_blob_masks(person, scene.resolution)):
                image[m] = KEYPOINT_COLOURS[k]
    return image


def render_entity(rng: np.random.Generator, shape: str, colour: str, resolution: int,
                  background_texture: float = 0.0) -> np.ndarray:
    """The same shape and colour alone, at a fresh random scale and position (reference image for grounding)."""
    obj = SceneObject(shape=shape, colour=colour, box=sample_box(rng, resolution))
    return render_scene(Scene(resolution=resolution, objects=[obj], background_texture=background_texture,
                              background_seed=int(rng.integers(2**31))))


# ------------------------------------------------------------------------------------------ captions, annotation


CAPTION_TEMPLATES = (
    "{}",
    "a picture of {}",
    "a photo of {}",
    "there is {}",
    "{} on a black background",
    "an image showing {}",
)
PERSON_CAPTIONS = ("a person", "a stick figure of a person", "one person standing")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(category: str) -> str:
    return f"{_article(category)} {category}"


def join_phrases(phrases: list[str]) -> str:
    """["a", "b", "c"] -> "a, b and c"."""
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def object_caption(rng: np.random.Generator, categories: list[str], style: str | None = None) -> str:
    """A templated caption naming every object; with a style, "... on a <style> background" (never the black one)."""
    templates = [t for t in CAPTION_TEMPLATES if "background" not in t] if style else CAPTION_TEMPLATES
    caption = templates[int(rng.integers(len(templates)))].format(join_phrases([object_phrase(c) for c in categories]))
    return f"{caption} on a {style} background" if style else caption


def caption_style(caption: str) -> str | None:
    """The style a caption asks for ("... on a striped background" -> "striped"), else None."""
    words = caption.split()
    for style in STYLES:
        if f"{style} background" in caption and style in words:
            return style
    return None


def person_caption(rng: np.random.Generator) -> str:
    return PERSON_CAPTIONS[int(rng.integers(len(PERSON_CAPTIONS)))]


def scene_annotation(scene: Scene, kind: str, source_id: str, with_entities: bool) -> dict:
    """Annotation dict in schema v1. Boxes are the tight boxes of the drawn shapes, normalised xyxy."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    r = scene.resolution
    objects = []
    for i, obj in enumerate(scene.objects):
        x0, y0, x1, y1 = obj.box
        objects.append({
            "box": [x0 / r, y0 / r, x1 / r, y1 / r],
            # Grounding data carries free phrases; detection data carries class names (official convention).
            "phrase": object_phrase(obj.category) if kind == "grounding" else obj.category,
            "category": obj.category,
            "entity_image": f"entity{i}.png" if with_entities else None,
        })
    annotation = {"schema_version": SCHEMA_VERSION, "kind": kind, "source_id": source_id,
                  "width": r, "height": r, "objects": objects}
    if scene.persons:
        annotation["persons"] = [
            {"keypoints": [[float(x / r), float(y / r), 2] for x, y in p.keypoints_px()]} for p in scene.persons]
    return annotation


# ------------------------------------------------------------------------------------------------ samples, splits


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def sample_rng(split: str, family: str, kind: str, index: int, seed: int = 0) -> np.random.Generator:
    """Independent stream per sample: a sample depends on (seed, split, family, kind, index) only."""
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return np.random.default_rng([seed, SPLIT_IDS[split], FAMILIES.index(family), KINDS.index(kind), index])


def split_pairs(split: str) -> tuple[tuple[str, str], ...]:
    return HELD_OUT_PAIRS if split == "ood" else SEEN_PAIRS


def make_scene(split: str, index: int, kind: str = "grounding", family: str = "objects",
               resolution: int | None = None, seed: int = 0, background_texture: float = 0.0,
               geometry: ObjectGeometry = DEFAULT_GEOMETRY) -> tuple[Scene, np.random.Generator]:
    """The scene of one sample, plus its generator (positioned after the scene, for caption and entities)."""
    rng = sample_rng(split, family, kind, index, seed)
    if family in ("objects", "styled"):
        scene = sample_object_scene(rng, resolution or DEFAULT_RESOLUTION, pairs=split_pairs(split),
                                    background_texture=background_texture, geometry=geometry)
        if family == "styled":
            scene.style = STYLES[int(rng.integers(len(STYLES)))]
    elif family == "persons":
        scene = sample_person_scene(rng, resolution or DEFAULT_RESOLUTION,
                                    background_texture=background_texture)
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return scene, rng


def make_sample(split: str, index: int, kind: str = "grounding", family: str = "objects",
                resolution: int | None = None, seed: int = 0, background_texture: float = 0.0,
                with_entities: bool = True, geometry: ObjectGeometry = DEFAULT_GEOMETRY) -> dict:
    """One WebDataset sample: {"__key__", "png", "txt", "json", "entity{i}.png"...}.

    kind: annotation kind (schema v1 has no "keypoint" kind; person scenes are a family, annotated as
    "grounding" by default with a person caption). Caption: "" for "detection", templated otherwise.
    resolution: None picks DEFAULT_RESOLUTION (32). geometry: object sizes and count (objects and styled families).
    """
    scene, rng = make_scene(split, index, kind, family, resolution, seed, background_texture, geometry)
    key = f"toy-{family}-{split}-{kind}-s{seed}-{index:08d}"
    categories = [o.category for o in scene.objects]
    if kind == "detection":
        caption = ""
    elif family == "persons":
        caption = person_caption(rng)
    else:
        caption = object_caption(rng, categories, scene.style)
    with_entities = with_entities and family != "persons"
    sample = {"__key__": key, "png": png_bytes(render_scene(scene)), "txt": caption,
              "json": scene_annotation(scene, kind, source_id=key, with_entities=with_entities)}
    if with_entities:
        for i, obj in enumerate(scene.objects):
            sample[f"entity{i}.png"] = png_bytes(
                render_entity(rng, obj.shape, obj.colour, scene.resolution, background_texture))
    return sample


def iter_split(split: str, kind: str, n: int, family: str = "objects", resolution: int | None = None,
               seed: int = 0, background_texture: float = 0.0, with_entities: bool = True,
               geometry: ObjectGeometry = DEFAULT_GEOMETRY):
    """Samples 0..n-1 of a split, lazily."""
    for index in range(n):
        yield make_sample(split, index, kind=kind, family=family, resolution=resolution, seed=seed,
                          background_texture=background_texture, with_entities=with_entities, geometry=geometry)


def write_split(split: str, kind: str, n: int, out_dir: str, resolution: int | None = None, seed: int = 0,
                family: str = "objects", max_samples: int = 1000, background_texture: float = 0.0,
                with_entities: bool = True, progress: bool = False,
                geometry: ObjectGeometry = DEFAULT_GEOMETRY) -> dict:
    """Write n samples of a split as schema-v1 tar shards ``{out_dir}/{family}-{split}-{kind}-NNNNNN.tar``.

    Returns ``write_shards``' index (shard names, sample counts, kinds).
    """
    samples = iter_split(split, kind, n, family=family, resolution=resolution, seed=seed,
                         background_texture=background_texture, with_entities=with_entities, geometry=geometry)
    return write_shards(samples, out_dir, prefix=f"{family}-{split}-{kind}", max_samples=max_samples,
                        progress=progress)
