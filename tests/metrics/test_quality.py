import io

import numpy as np
import pytest
import torch
from PIL import Image

from gligen.metrics import quality
from gligen.metrics.quality import (
    INCEPTION,
    TOY_CLIP,
    CLIPImageFeatureExtractor,
    as_image_dataset,
    auto_kid_subset_size,
    quality_metrics,
    resolve_feature_extractor,
)
from gligen.toy import world

N = 48  # images per set: more than the 16-d features, so the covariances are full rank


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> str:
    """A tiny randomly initialised CLIPModel (32 px, patch 8), saved like the toy LDM's `clip/`."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2),
        projection_dim=16,
    )
    path = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(path)
    return str(path)


def toy_images(start: int, n: int = N) -> torch.Tensor:
    """uint8 [n, 3, 32, 32] toy scenes (one distribution: the test split)."""
    decoded = [np.array(Image.open(io.BytesIO(world.make_sample("test", i, with_entities=False)["png"])).convert("RGB"))
               for i in range(start, start + n)]
    return torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def sets() -> dict[str, torch.Tensor]:
    a, a_other = toy_images(0), toy_images(N)
    # A clearly different distribution: the same kind of scenes with inverted colours (white background).
    return {"a": a, "a_other": a_other, "b": 255 - toy_images(2 * N)}


@pytest.fixture(scope="module")
def scores(sets, clip_dir) -> dict[str, dict[str, float]]:
    return {name: quality_metrics(sets["a"], sets[name], clip_dir=clip_dir) for name in ("a", "a_other", "b")}


def test_a_set_against_itself_scores_zero(scores):
    assert abs(scores["a"]["fid"]) < 1e-4
    # KID draws different subsets from the two inputs, so against itself it is ~0, not exactly 0.
    assert abs(scores["a"]["kid"]) < 0.05 * scores["b"]["kid"]


def test_different_distribution_scores_worse_than_a_fresh_sample_of_the_same_one(scores):
    print(f"\ntoy-clip scores: {scores}")
    assert scores["b"]["fid"] > 3 * scores["a_other"]["fid"] > 0
    assert scores["b"]["kid"] > 3 * scores["a_other"]["kid"]
    assert all(s["kid_std"] >= 0 for s in scores.values())


def test_deterministic_across_calls(sets, clip_dir, scores):
    assert quality_metrics(sets["a"], sets["b"], clip_dir=clip_dir) == scores["b"]


def test_folder_and_array_list_inputs_match_the_tensor_input(sets, clip_dir, scores, tmp_path):
    arrays = list(sets["b"].permute(0, 2, 3, 1).numpy())
    for i, image in enumerate(arrays):
        Image.fromarray(image).save(tmp_path / f"{i:04d}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    from_folder = quality_metrics(sets["a"], tmp_path, clip_dir=clip_dir)
    from_arrays = quality_metrics(list(sets["a"].permute(0, 2, 3, 1).numpy()), arrays, clip_dir=clip_dir)
    assert from_folder == pytest.approx(scores["b"], rel=1e-5, abs=1e-7)
    assert from_arrays == pytest.approx(scores["b"], rel=1e-5, abs=1e-7)


def test_clip_extractor_gives_unit_norm_embeddings_at_any_input_size(clip_dir, sets):
    extractor = CLIPImageFeatureExtractor(TOY_CLIP, [quality.CLIP_FEATURE], feature_extractor_weights_path=clip_dir)
    (features,) = extractor(sets["a"][:4])
    assert features.shape == (4, 16)
    assert torch.allclose(features.norm(dim=-1), torch.ones(4), atol=1e-5)
    (upsampled,) = extractor(torch.nn.functional.interpolate(sets["a"][:4].float(), scale_factor=2).to(torch.uint8))
    assert upsampled.shape == (4, 16)
    with pytest.raises(ValueError, match="uint8"):
        extractor(sets["a"][:4].float())


def test_dataset_rejects_non_uint8_images():
    with pytest.raises(ValueError, match="uint8"):
        as_image_dataset(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="uint8"):
        as_image_dataset([np.zeros((8, 8, 3), dtype=np.float32)])


def test_kid_subset_size_is_capped_by_the_smaller_set():
    assert auto_kid_subset_size(5000, 3000) == 1000
    assert auto_kid_subset_size(40, 300) == 40
    assert auto_kid_subset_size(40, 300, requested=10) == 10
    with pytest.raises(ValueError, match="KID subset size"):
        auto_kid_subset_size(40, 300, requested=41)
    with pytest.raises(ValueError, match="KID subset size"):
        auto_kid_subset_size(1, 300)


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """An empty torch hub cache: no Inception weights downloaded earlier."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_clear_error_when_no_extractor_is_available(empty_hub, sets):
    with pytest.raises(ValueError, match="inception_weights=.*clip_dir="):
        quality_metrics(sets["a"], sets["b"])


def test_extractor_choice(empty_hub, clip_dir, tmp_path):
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"")
    assert resolve_feature_extractor(clip_dir=clip_dir) == (TOY_CLIP, clip_dir)
    assert resolve_feature_extractor(clip_dir=clip_dir, inception_weights=weights) == (INCEPTION, str(weights))
    with pytest.raises(FileNotFoundError):
        resolve_feature_extractor(inception_weights=tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError):
        resolve_feature_extractor(clip_dir=tmp_path)
    # Weights torch-fidelity downloaded earlier are used when nothing is named; a named clip_dir still wins.
    cached = empty_hub / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert resolve_feature_extractor() == (INCEPTION, str(cached))
    assert resolve_feature_extractor(clip_dir=clip_dir) == (TOY_CLIP, clip_dir)
