"""Constants every layer shares: COCO keypoints and the grounding slot limits (the bottom layer: imports nothing).

Slot limits are the official code's: 30 grounding objects per image, 8 persons of 17 COCO keypoints each.
"""

MAX_OBJECTS = 30
MAX_PERSONS = 8

# COCO keypoint order: nose, then (left, right) pairs of eye, ear, shoulder, elbow, wrist, hip, knee, ankle
COCO_KEYPOINTS = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)
NUM_KEYPOINTS = len(COCO_KEYPOINTS)
COCO_FLIP_PAIRS = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))
SKELETON = (  # COCO joint index pairs drawn as limbs
    (5, 6), (5, 7), (7, 9), (6, 8), (8, 10), (5, 11), (6, 12), (11, 12), (11, 13), (13, 15), (12, 14), (14, 16),
)
# per-joint OKS falloff of the COCO keypoint benchmark (pycocotools' default sigmas)
COCO_SIGMAS = tuple(s / 10 for s in (
    .26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89))
VISIBLE = 2  # only COCO visibility 2 ("labelled and visible") counts as a present keypoint
# where an LDM directory keeps the transformers CLIPModel whose image tower embeds image entities: <pretrained>/clip
# (the toy build and the official-checkpoint import write it there; FrozenLDM, sweeps and converters look there)
CLIP_SUBFOLDER = "clip"
