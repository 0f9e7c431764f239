import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor

from gligen.ldm import FrozenLDM
from gligen.nn.grounded_unet import add_grounding
from gligen.sampling import beta_schedule, sample, tau_schedule
from tests.helpers import RandomBoxDataModule, random_box_batch


def test_beta_schedule_matches_official_semantics_on_hand_computed_cases():
    assert beta_schedule(10, (0.3, 0.4, 0.3)) == [1, 1, 1, 0.75, 0.5, 0.25, 0, 0, 0, 0]
    assert beta_schedule(10, (0.3, 0.0, 0.7)) == [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert beta_schedule(4, (1, 0, 0)) == [1, 1, 1, 1]
    assert beta_schedule(5, (0, 1, 0)) == [0.8, 0.6, 0.4, 0.2, 0.0]
    # official int() step counts: int(0.29 * 100) == 28 (float rounding), the rest goes to the beta = 0 stage
    assert beta_schedule(100, (0.29, 0.0, 0.71)).count(1.0) == 28
    # 50 steps, [0.3, 0.2, 0.5]: 15 ones, 10 decaying values 0.9 .. 0, 25 zeros
    betas = beta_schedule(50, (0.3, 0.2, 0.5))
    assert betas[:15] == [1.0] * 15 and betas[15:25] == pytest.approx([0.9 - 0.1 * i for i in range(10)])
    assert betas[25:] == [0.0] * 25
    assert tau_schedule(10, 0.2) == [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    assert tau_schedule(7, 0.0) == [0.0] * 7 and tau_schedule(7, 1.0) == [1.0] * 7
    with pytest.raises(ValueError, match="summing to 1"):
        beta_schedule(10, (0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="tau"):
        tau_schedule(10, 1.5)


@pytest.fixture
def grounded_ldm(tiny_pretrained):
    torch.manual_seed(0)
    ldm = FrozenLDM(tiny_pretrained)
    add_grounding(ldm.unet, gamma_init=1.0)  # an open gate, so grounding visibly acts
    return ldm


def box_grounding(ldm, batch):
    return {
        "boxes": batch["boxes"],
        "masks": batch["masks"],
        "positive_embeddings": ldm.encode_phrases(batch["phrases"]),
    }


def test_tau_zero_gives_exactly_the_base_pipeline_images(tiny_pretrained, grounded_ldm):
    batch = random_box_batch()
    ours = sample(grounded_ldm, batch["captions"], box_grounding(grounded_ldm, batch),
                  betas=tau_schedule(5, 0.0), steps=5, guidance=3.0, seeds=[11, 12])
    base = StableDiffusionPipeline.from_pretrained(tiny_pretrained, safety_checker=None)
    base.scheduler = DDIMScheduler.from_config(base.scheduler.config)
    generators = [torch.Generator().manual_seed(s) for s in (11, 12)]
    latents = randn_tensor((2, 4, 8, 8), generator=generators)
    reference = base(batch["captions"], latents=latents, num_inference_steps=5, guidance_scale=3.0,
                     output_type="pt").images
    assert torch.allclose(ours, reference, atol=1e-5)
    grounded = sample(grounded_ldm, batch["captions"], box_grounding(grounded_ldm, batch),
                      betas=tau_schedule(5, 1.0), steps=5, guidance=3.0, seeds=[11, 12])
    assert not torch.allclose(grounded, reference, atol=1e-3)


def test_init_latents_give_diffusers_img2img_images(tiny_pretrained, grounded_ldm):
    from diffusers import StableDiffusionImg2ImgPipeline

    batch = random_box_batch()
    init = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ours = sample(grounded_ldm, batch["captions"], box_grounding(grounded_ldm, batch), betas=tau_schedule(5, 0.0),
                  steps=5, guidance=3.0, seeds=[11, 12], init_latents=init, strength=0.6)
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_pretrained, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    generators = [torch.Generator().manual_seed(s) for s in (11, 12)]
    reference = pipe(batch["captions"], image=init, strength=0.6, num_inference_steps=5, guidance_scale=3.0,
                     generator=generators, output_type="pt").images  # 4-channel images are taken as latents
    assert torch.allclose(ours, reference, atol=1e-5)
    full = sample(grounded_ldm, batch["captions"], None, steps=5, guidance=3.0, seeds=[11, 12])
    assert not torch.allclose(ours, full, atol=1e-3)  # the start latents matter
    with pytest.raises(ValueError, match="ddim"):
        sample(grounded_ldm, batch["captions"], None, sampler="plms", steps=5, init_latents=init, strength=0.5)
    with pytest.raises(ValueError, match="no step"):
        sample(grounded_ldm, batch["captions"], None, steps=5, init_latents=init, strength=0.1)


def test_same_seed_same_image_whatever_the_batch(grounded_ldm):
    batch = random_box_batch()
    grounding = box_grounding(grounded_ldm, batch)
    both = sample(grounded_ldm, batch["captions"], grounding, steps=3, seeds=[5, 6])
    again = sample(grounded_ldm, batch["captions"], grounding, steps=3, seeds=[5, 6])
    alone = sample(grounded_ldm, batch["captions"][1:], {k: v[1:] for k, v in grounding.items()}, steps=3, seeds=[6])
    assert torch.equal(both, again)
    assert torch.allclose(both[1:], alone, atol=1e-5)
    other = sample(grounded_ldm, batch["captions"], grounding, steps=3, seeds=[7, 8])
    assert not torch.allclose(both, other)


def test_unconditional_branch_gets_null_grounding_and_betas_reach_the_fusers(grounded_ldm, monkeypatch):
    batch = random_box_batch()
    seen_masks, seen_betas = [], []
    position_net = grounded_ldm.unet.position_net
    original = position_net.forward

    def spy(boxes, masks, positive_embeddings):
        seen_masks.append(masks.clone())
        fuser = next(m for m in grounded_ldm.unet.modules() if hasattr(m, "alpha_attn"))
        seen_betas.append(fuser.beta)
        return original(boxes, masks, positive_embeddings)

    monkeypatch.setattr(position_net, "forward", spy)
    sample(grounded_ldm, batch["captions"], box_grounding(grounded_ldm, batch),
           betas=beta_schedule(4, (0.25, 0.5, 0.25)), steps=4, guidance=2.0)
    # 4 steps: beta 1, 0.5, 0 (decay stage), 0 -> the position net runs only while beta > 0
    assert seen_betas == [1.0, 0.5]
    for masks in seen_masks:
        assert masks[:2].sum() == 0  # unconditional half: every object nulled
        assert torch.equal(masks[2:], batch["masks"])
    fuser = next(m for m in grounded_ldm.unet.modules() if hasattr(m, "alpha_attn"))
    assert fuser.beta == 1.0  # restored after sampling


@pytest.mark.parametrize("sampler", ["ddim", "plms", "dpm++"])
def test_each_sampler_runs_and_is_deterministic(grounded_ldm, sampler):
    batch = random_box_batch()
    grounding = box_grounding(grounded_ldm, batch)
    a = sample(grounded_ldm, batch["captions"], grounding, sampler=sampler, steps=4, seeds=3)
    b = sample(grounded_ldm, batch["captions"], grounding, sampler=sampler, steps=4, seeds=3)
    assert a.shape == (2, 3, 16, 16) and torch.equal(a, b) and 0 <= a.min() and a.max() <= 1


def test_sample_cli_from_checkpoint_writes_image_and_boxes(tiny_pretrained, tmp_path):
    import json

    import lightning as L
    from PIL import Image

    from gligen.evaluation.sample import main
    from gligen.module import GLIGENModule

    L.seed_everything(0)
    module = GLIGENModule(tiny_pretrained, gamma_init=0.5, warmup_steps=0)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, RandomBoxDataModule())
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps({"prompt": "a red square", "objects": [
        {"box": [0.1, 0.1, 0.5, 0.5], "phrase": "red square"},
        {"box": [0.5, 0.4, 0.9, 0.9], "phrase": "blue circle"}]}))
    args = ["--ckpt", str(tmp_path / "m.ckpt"), "--layout", str(layout), "--steps", "3", "--tau", "1", "--seed", "4"]
    main(args + ["--out", str(tmp_path / "a.png")])
    main(args + ["--out", str(tmp_path / "b.png")])
    a, b = Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")
    assert a.size == (16, 16) and a.tobytes() == b.tobytes()
    assert Image.open(tmp_path / "a_boxes.png").size == (256, 256)

    layout.write_text(json.dumps({"objects": [{"box": [0.6, 0.1, 0.5, 0.5], "phrase": "x"}]}))
    with pytest.raises(ValueError, match="layout.json.*x0 < x1"):
        main(args + ["--out", str(tmp_path / "c.png")])
    layout.write_text("{not json")
    with pytest.raises(ValueError, match="layout.json: bad layout file"):
        main(args + ["--out", str(tmp_path / "c.png")])
