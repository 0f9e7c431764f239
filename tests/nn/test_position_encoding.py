"""position_encoding: the paper's Fourier box embedding or its ablation (the coordinates as they are), in every
grounding tokenizer, chosen on GLIGENModule and kept by its checkpoints."""

import pytest
import torch

from gligen.nn.fourier import fourier_embed, position_dim, position_features
from gligen.nn.tokenizers import KeypointTokenizer, TextBoxTokenizer, TextImageBoxTokenizer


def test_raw_encoding_feeds_the_coordinates_and_fourier_stays_the_default():
    boxes = torch.rand(2, 3, 4)
    assert torch.equal(position_features(boxes, "raw"), boxes)
    assert torch.equal(position_features(boxes), fourier_embed(boxes, 8))
    assert position_dim(4, "raw") == 4 and position_dim(4) == 64 and position_dim(2) == 32
    with pytest.raises(ValueError, match="fourier"):
        position_features(boxes, "mlp")


@pytest.mark.parametrize("encoding", ["fourier", "raw"])
def test_every_tokenizer_takes_the_encoding(encoding):
    width = position_dim(4, encoding)
    box = TextBoxTokenizer(positive_len=16, out_dim=8, position_encoding=encoding)
    assert box.linears[0].in_features == 16 + width and box.null_position_feature.shape == (width,)
    tokens = box(torch.rand(2, 3, 4), torch.ones(2, 3), torch.rand(2, 3, 16))
    assert tokens.shape == (2, 3, 8)
    entity = TextImageBoxTokenizer(in_dim=16, out_dim=8, position_encoding=encoding)
    assert entity.linears_text[0].in_features == 16 + width
    keypoint = KeypointTokenizer(in_dim=16, out_dim=8, max_persons=2, position_encoding=encoding)
    assert keypoint.null_xy_feature.shape == (position_dim(2, encoding),)


def test_the_module_builds_the_encoding_and_its_checkpoint_rebuilds_it(tiny_pretrained, tmp_path):
    from gligen.module import GLIGENModule

    module = GLIGENModule(tiny_pretrained, position_encoding="raw")
    assert module.ldm.unet.position_net.position_encoding == "raw"
    assert module.ldm.unet.position_net.position_dim == 4
    assert GLIGENModule(tiny_pretrained).ldm.unet.position_net.position_encoding == "fourier"
    problems = module.modality.diffusers_problems(module.ldm.unet.position_net, 32)
    assert problems and "Fourier only" in problems[0]
    with pytest.raises(ValueError, match="position_encoding"):
        GLIGENModule(tiny_pretrained, position_encoding="mlp")
    # a checkpoint rebuilds the encoding it was trained with
    import lightning as L

    from tests.helpers import RandomBoxDataModule
    from tests.test_module import trainer

    L.seed_everything(0)
    t = trainer(tmp_path, max_steps=1)
    t.fit(module, RandomBoxDataModule())
    t.save_checkpoint(tmp_path / "raw.ckpt")
    loaded = GLIGENModule.from_checkpoint(str(tmp_path / "raw.ckpt"), tiny_pretrained)
    assert loaded.ldm.unet.position_net.position_encoding == "raw"
    assert torch.equal(loaded.ldm.unet.position_net.linears[0].weight, module.ldm.unet.position_net.linears[0].weight)
