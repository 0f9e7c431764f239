import pytest
import torch

from gligen.toy.pipeline import TinyPipelineConfig, build_tiny_pipeline


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory) -> str:
    """A tiny random SD-shaped pipeline saved as a diffusers directory (the `pretrained` of the tests)."""
    return str(build_tiny_pipeline(tmp_path_factory.mktemp("tiny_ldm"), TinyPipelineConfig(), seed=0))


def random_box_batch(batch_size=2, num_objects=30, image_size=16, seed=0, valid=(2, 3)):
    """A batch in the contract of docs/batch_contract.md with `valid[i]` real objects in sample i."""
    g = torch.Generator().manual_seed(seed)
    boxes = torch.zeros(batch_size, num_objects, 4)
    masks = torch.zeros(batch_size, num_objects)
    phrases = [[""] * num_objects for _ in range(batch_size)]
    words = ["red square", "blue circle", "green triangle", "a red circle"]
    for i in range(batch_size):
        for j in range(valid[i % len(valid)]):
            xy = torch.rand(2, generator=g) * 0.5
            wh = torch.rand(2, generator=g) * 0.4 + 0.1
            boxes[i, j] = torch.cat([xy, xy + wh])
            masks[i, j] = 1
            phrases[i][j] = words[(i + j) % len(words)]
    return {
        "pixel_values": torch.rand(batch_size, 3, image_size, image_size, generator=g) * 2 - 1,
        "captions": ["a red square and a blue circle", "a green triangle"][:batch_size] + [""] * max(0, batch_size - 2),
        "boxes": boxes,
        "masks": masks,
        "phrases": phrases,
        "keys": [f"sample-{i}" for i in range(batch_size)],
    }
