"""GLIGENModule with the keypoint, image and text_image modalities (box is covered by test_module.py)."""

import lightning as L
import pytest
import torch
from diffusers import UNet2DConditionModel
from lightning.pytorch.callbacks import Callback

from gligen.modalities import modality_names
from gligen.module import GLIGENModule
from gligen.nn.tokenizers import GroundingInputError, KeypointTokenizer, TextBoxTokenizer, TextImageBoxTokenizer
from tests.helpers import TEXT_WIDTH, RandomModalityDataModule, random_modality_batch

NEW_MODALITIES = ("keypoint", "image", "text_image")


class FrozenGradWatch(Callback):
    def __init__(self):
        self.offenders = set()

    def on_after_backward(self, trainer, module):
        self.offenders |= {n for n, p in module.named_parameters() if not p.requires_grad and p.grad is not None}


def make_module(pretrained, modality, **kwargs):
    return GLIGENModule(pretrained, modality=modality, **{"learning_rate": 1e-3, "warmup_steps": 0, **kwargs})


def test_modalities_and_their_tokenizers(tiny_pretrained):
    assert set(modality_names()) >= {"box", "keypoint", "image", "text_image"}
    expected = {"box": TextBoxTokenizer, "keypoint": KeypointTokenizer, "image": TextImageBoxTokenizer,
                "text_image": TextImageBoxTokenizer}
    for modality, cls in expected.items():
        net = make_module(tiny_pretrained, modality).ldm.unet.position_net
        assert type(net) is cls
    net = make_module(tiny_pretrained, "text_image").ldm.unet.position_net
    assert net.in_dim == TEXT_WIDTH and net.linears_text[4].out_features == TEXT_WIDTH
    with pytest.raises(ValueError, match="modality must be one of"):
        make_module(tiny_pretrained, "depth")


@pytest.mark.parametrize("modality", NEW_MODALITIES)
def test_two_training_steps_update_only_grounding_and_checkpoint_round_trips(tiny_pretrained, tmp_path, modality):
    L.seed_everything(0)
    module = make_module(tiny_pretrained, modality)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    watch = FrozenGradWatch()
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=2, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[watch])
    trainer.fit(module, RandomModalityDataModule())
    assert not watch.offenders
    frozen_changed = [n for n, p in module.named_parameters() if not p.requires_grad and not torch.equal(p, before[n])]
    trainable_same = [n for n, p in module.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert not frozen_changed
    assert not trainable_same  # includes every position_net parameter: nulls, embeddings, both MLPs
    assert any(n.startswith("ldm.unet.position_net.") for n in before)

    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = GLIGENModule.from_checkpoint(str(path))
    assert loaded.hparams.modality == modality
    for name, p in module.trainable_named_parameters():
        assert torch.equal(dict(loaded.named_parameters())[name], p), name


@pytest.mark.parametrize("modality", NEW_MODALITIES)
def test_gamma_zero_gives_exactly_the_frozen_unet(tiny_pretrained, modality):
    torch.manual_seed(0)
    module = make_module(tiny_pretrained, modality, gamma_init=0.0).eval()
    with torch.no_grad():  # a non-trivial tokenizer: tokens differ from zero-init ones
        for p in module.ldm.unet.position_net.parameters():
            p.normal_(std=0.1)
    plain = UNet2DConditionModel.from_pretrained(tiny_pretrained, subfolder="unet").eval()
    batch = random_modality_batch()
    latents = torch.randn(2, plain.config.in_channels, 8, 8)
    timesteps = torch.tensor([10, 500])
    with torch.no_grad():
        context = module.ldm.encode_captions(batch["captions"])
        grounding = module.batch_grounding(batch)
        assert module.ldm.unet.position_net(**grounding).abs().sum() > 0
        grounded = module.ldm.unet(latents, timesteps, context, cross_attention_kwargs={"gligen": grounding}).sample
        reference = plain(latents, timesteps, context).sample
    assert torch.equal(grounded, reference)


def test_keypoint_grounding_and_cfg_dropout(tiny_pretrained):
    module = make_module(tiny_pretrained, "keypoint")
    batch = random_modality_batch()
    grounding = module.batch_grounding(batch, drop=torch.tensor([False, True]))
    assert set(grounding) == {"points", "masks"}
    assert torch.equal(grounding["points"], batch["keypoints"])
    assert torch.equal(grounding["masks"][0], batch["keypoint_masks"][0]) and not grounding["masks"][1].any()
    assert module.ldm.unet.position_net(**grounding).shape == (2, 136, TEXT_WIDTH)


def test_bad_keypoints_in_a_batch_name_the_sample(tiny_pretrained):
    module = make_module(tiny_pretrained, "keypoint")
    batch = random_modality_batch()
    batch["keypoints"][1, 3, 5], batch["keypoint_masks"][1, 3, 5] = torch.tensor([1.5, 0.5]), 1
    with pytest.raises(GroundingInputError, match="sample 1 \\(sample-1\\), person 3, keypoint 5"):
        module.batch_grounding(batch)
    module.hparams.check_inputs = False
    module.batch_grounding(batch)


def test_text_image_grounding_masks(tiny_pretrained):
    module = make_module(tiny_pretrained, "text_image")
    batch = random_modality_batch(valid=(30, 30))
    masks = batch["masks"]
    has_image = masks.clone()
    has_image[:, 0] = 0  # object 0 has no entity image
    # evaluation: every feature that exists is used, nothing random
    module.eval()
    grounding = module.batch_grounding(batch)
    assert set(grounding) == {"boxes", "masks", "phrases_masks", "image_masks", "phrases_embeddings",
                              "image_embeddings"}
    assert torch.equal(grounding["masks"], masks) and torch.equal(grounding["phrases_masks"], masks)
    assert torch.equal(grounding["image_masks"], has_image)
    assert torch.allclose(grounding["phrases_embeddings"], module.ldm.encode_phrases(batch["phrases"]))
    assert torch.equal(grounding["image_embeddings"], batch["entity_embeds"])
    assert module.ldm.unet.position_net(**grounding).shape == (2, 60, TEXT_WIDTH)
    # precomputed phrase features are used as they are
    precomputed = {**batch, "phrase_embeds": torch.ones(2, 30, TEXT_WIDTH)}
    assert torch.equal(module.batch_grounding(precomputed)["phrases_embeddings"], torch.ones(2, 30, TEXT_WIDTH))
    with pytest.raises(GroundingInputError, match="entity_embeds shape \\(2, 30, 16\\)"):
        module.batch_grounding({**batch, "entity_embeds": torch.zeros(2, 30, 16)})
    # an explicit entity_masks overrides the non-zero-row rule
    only_first = torch.zeros_like(masks)
    only_first[:, 1] = 1
    assert torch.equal(module.batch_grounding({**batch, "entity_masks": only_first})["image_masks"], only_first)

    # training: boxes with both features lose text or image (never both); text-only boxes keep their text
    module.train()
    torch.manual_seed(0)
    grounding = module.batch_grounding(batch)
    phrases_masks, image_masks = grounding["phrases_masks"], grounding["image_masks"]
    both = has_image.bool()
    assert torch.equal(phrases_masks[:, 0], masks[:, 0]) and not image_masks[:, 0].any()
    assert ((phrases_masks + image_masks)[both] == 1).any()  # something was dropped (58 coins)
    assert ((phrases_masks + image_masks)[both] >= 1).all()
    assert (phrases_masks <= masks).all() and (image_masks <= has_image).all()
    # grounding CFG dropout nulls every mask of the sample
    dropped = module.batch_grounding(batch, drop=torch.tensor([True, False]))
    for key in ("masks", "phrases_masks", "image_masks"):
        assert not dropped[key][0].any(), key
    assert dropped["masks"][1].sum() == 30


def test_image_only_masks_every_text_feature_and_needs_no_phrases(tiny_pretrained, monkeypatch):
    module = make_module(tiny_pretrained, "image")
    batch = random_modality_batch()
    batch["phrases"] = [[""] * 30, [""] * 30]  # image grounding needs no phrases

    def refuse(*args, **kwargs):
        raise AssertionError("the text encoder ran for image-only grounding")

    monkeypatch.setattr(module.ldm.text_encoder, "forward", refuse)
    for training in (True, False):
        module.train(training)
        grounding = module.batch_grounding(batch)
        assert not grounding["phrases_masks"].any() and not grounding["phrases_embeddings"].any()
        expected = batch["masks"].clone()
        expected[:, 0] = 0
        assert torch.equal(grounding["image_masks"], expected)
        assert torch.equal(grounding["masks"], batch["masks"])


def test_validation_loss_is_deterministic_for_text_image(tiny_pretrained):
    module = make_module(tiny_pretrained, "text_image").eval()
    batch = random_modality_batch()
    no_drop = torch.zeros(2, dtype=torch.bool)
    losses = []
    for _ in range(2):
        torch.manual_seed(0)  # the VAE posterior sample; the entity drop must not add randomness in eval
        losses.append(module.diffusion_loss(batch, no_drop, no_drop, torch.Generator().manual_seed(0)))
    assert torch.equal(losses[0], losses[1])
