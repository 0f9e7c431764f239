"""Export to diffusers' GLIGEN pipeline and import of official GLIGEN checkpoints, on tiny models."""

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from gligen.interop import InteropError, StableDiffusionGLIGENPipeline, import_official, load_official
from gligen.interop.__main__ import main as convert_main
from gligen.module import GLIGENModule
from gligen.sampling import sample, tau_schedule
from tests.helpers import (
    assert_same_grounded_output,
    assert_same_ldm_weights,
    grounded_module,
    official_checkpoint,
    save_like_lightning,
    unet_to_official,
)

LAYOUT = {
    "prompt": "a red square and a blue circle",
    "phrases": ["red square", "blue circle"],
    "boxes": [[0.1, 0.1, 0.5, 0.6], [0.45, 0.3, 0.95, 0.9]],
}


# ---------------------------------------------------------------------------------------------------------------------
# 1. to-diffusers
# ---------------------------------------------------------------------------------------------------------------------


def test_exported_pipeline_gives_our_images(tiny_pretrained, tmp_path):
    module = grounded_module(tiny_pretrained)
    ckpt = tmp_path / "m.ckpt"
    save_like_lightning(module, ckpt)
    convert_main(["to-diffusers", str(ckpt), str(tmp_path / "exported")])
    pipe = StableDiffusionGLIGENPipeline.from_pretrained(tmp_path / "exported")
    pipe.set_progress_bar_config(disable=True)
    # diffusers rebuilt its own fusers from attention_type="gated" and every weight arrived
    assert pipe.unet.config.attention_type == "gated"
    ours = module.ldm.unet.state_dict()
    theirs = pipe.unet.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)

    # tau 0.5 of 4 steps: grounding on for 2 steps, then diffusers switches the fusers off, we set beta = 0
    steps, guidance, seed, tau = 4, 5.0, 3, 0.5
    n = len(LAYOUT["phrases"])
    boxes = torch.zeros(1, 30, 4)
    boxes[0, :n] = torch.tensor(LAYOUT["boxes"])
    masks = torch.zeros(1, 30)
    masks[0, :n] = 1
    grounding = {
        "boxes": boxes,
        "masks": masks,
        "positive_embeddings": module.ldm.encode_phrases([LAYOUT["phrases"] + [""] * (30 - n)]),
    }
    ours = sample(module.ldm, [LAYOUT["prompt"]], grounding, tau_schedule(steps, tau), "ddim", steps, guidance, [seed])
    # the same initial noise sample() draws for this seed
    latents = randn_tensor((1, 4, 8, 8), generator=[torch.Generator("cpu").manual_seed(seed)], dtype=torch.float32)
    theirs = pipe(
        prompt=LAYOUT["prompt"],
        gligen_phrases=LAYOUT["phrases"],
        gligen_boxes=LAYOUT["boxes"],
        gligen_scheduled_sampling_beta=tau,
        num_inference_steps=steps,
        guidance_scale=guidance,
        latents=latents,
        output_type="pt",
    ).images
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    # grounding matters here (so the comparison would catch dropped fuser / position-net weights)
    ungrounded = sample(module.ldm, [LAYOUT["prompt"]], None, None, "ddim", steps, guidance, [seed])
    assert (ours - ungrounded).abs().max() > 1e-2
    assert theirs.shape == ours.shape
    # measured: identical (max |diff| 0.0 on CPU fp32); 1e-4 leaves room for other kernels / devices
    assert torch.allclose(theirs, ours, atol=1e-4, rtol=0), (theirs - ours).abs().max()


def test_export_refuses_other_fuser_types(tiny_pretrained, tmp_path):
    module = GLIGENModule(tiny_pretrained, fuser_type="gated_cross_attention")
    save_like_lightning(module, tmp_path / "m.ckpt")
    with pytest.raises(SystemExit):
        convert_main(["to-diffusers", str(tmp_path / "m.ckpt"), str(tmp_path / "out")])
    from gligen.interop import export_to_diffusers

    with pytest.raises(InteropError, match=r"fuser_type is 'gated_cross_attention'.*gated_self_attention"):
        export_to_diffusers(tmp_path / "m.ckpt", tmp_path / "out")


# ---------------------------------------------------------------------------------------------------------------------
# 2. from-official
# ---------------------------------------------------------------------------------------------------------------------
# Official-layout checkpoints come from tests/helpers.py (`official_checkpoint`), which inverts diffusers'
# LDM -> diffusers renaming.


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """An official-layout checkpoint of a tiny GLIGEN whose base weights differ from the conftest pipeline
    (seed 1), so an import that took any weight from --base instead of the file would be caught."""
    from gligen.toy.pipeline import TinyPipelineConfig, build_tiny_pipeline

    tmp = tmp_path_factory.mktemp("official")
    module = grounded_module(str(build_tiny_pipeline(tmp / "seed1", TinyPipelineConfig(), seed=1)), seed=1)
    checkpoint = official_checkpoint(module)
    torch.save(checkpoint, tmp / "official.pth")
    return module, checkpoint, tmp / "official.pth"


def test_official_import_round_trips_every_weight(official, tiny_pretrained, tmp_path):
    original, _, path = official
    convert_main(["from-official", str(path), str(tmp_path / "imported"), "--base", tiny_pretrained])
    imported = GLIGENModule.from_checkpoint(str(tmp_path / "imported" / "gligen.ckpt")).eval()
    assert imported.hparams.pretrained == str((tmp_path / "imported" / "pretrained").resolve())
    assert_same_ldm_weights(original, imported)

    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    grounding = {
        "boxes": torch.rand(2, 30, 4, generator=g).sort(-1).values,
        "masks": (torch.rand(2, 30, generator=g) > 0.5).float(),
        "positive_embeddings": torch.randn(2, 30, 32, generator=g),
    }
    assert_same_grounded_output(original, imported, x, context, grounding)


def test_unknown_layout_is_refused(tmp_path):
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}}, tmp_path / "sd.ckpt")
    with pytest.raises(InteropError, match=r"expected an official GLIGEN checkpoint with keys \['model'.*missing"):
        load_official(tmp_path / "sd.ckpt")
    parts = {k: {} for k in ("model", "autoencoder", "text_encoder", "diffusion")}
    torch.save({**parts, "foo": {}}, tmp_path / "e.pth")
    with pytest.raises(InteropError, match=r"unexpected top-level keys \['foo'\]"):
        load_official(tmp_path / "e.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(InteropError, match=r"expected an official GLIGEN checkpoint.*found a list"):
        load_official(tmp_path / "list.pth")


class NotATensor:  # stands for OmegaConf's config objects in official files
    pass


def test_pickled_objects_are_refused_without_unpickling(tmp_path):
    torch.save({"model": {}, "config_dict": NotATensor()}, tmp_path / "pickled.pth")
    with pytest.raises(InteropError, match=r"(?s)weights_only=True.*OmegaConf.*Unsupported global.*NotATensor"):
        load_official(tmp_path / "pickled.pth")


def damaged(checkpoint, part, drop=(), add=None, replace=None):
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in checkpoint.items()}
    for key in drop:
        del out[part][key]
    out[part].update(add or {})
    out[part].update(replace or {})
    return out


def test_damaged_checkpoints_are_refused_listing_keys(official, tiny_pretrained, tmp_path):
    _, checkpoint, _ = official
    fuser_key = next(k for k in checkpoint["model"] if ".fuser.alpha_attn" in k)
    cases = [
        (damaged(checkpoint, "model", drop=[fuser_key, "out.2.bias"]),
         r"missing from the file: .*(conv_out\.bias|fuser\.alpha_attn).*(conv_out\.bias|fuser\.alpha_attn)"),
        (damaged(checkpoint, "model", add={"bogus.weight": torch.zeros(3)}),
         r"'model': 1 keys were not converted: bogus"),
        (damaged(checkpoint, "autoencoder", drop=["encoder.conv_in.weight"]),
         r"VAE.*missing.*encoder\.conv_in\.weight"),
        (damaged(checkpoint, "text_encoder", add={"transformer.extra": torch.zeros(1)}),
         r"CLIP.*not in the model.*extra"),
        (damaged(checkpoint, "diffusion", replace={"betas": torch.linspace(1e-4, 0.02, 1000)}),
         r"'diffusion' buffer 'betas' does not match.*scaled_linear"),
        (damaged(checkpoint, "model", drop=[k for k in checkpoint["model"] if k.startswith("position_net.")]),
         r"expected GLIGEN layers.*0 position_net keys"),
        (damaged(checkpoint, "model", drop=[k for k in checkpoint["model"] if ".fuser.linear." in k]),
         r"no `linear`.*gatedCA.*only gated self-attention"),
        (damaged(checkpoint, "model", replace={"input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3)}),
         r"takes 9 input channels.*inpainting"),
    ]
    for i, (bad, message) in enumerate(cases):
        torch.save(bad, tmp_path / f"bad{i}.pth")
        with pytest.raises(InteropError, match=message):
            import_official(tmp_path / f"bad{i}.pth", tmp_path / f"out{i}", base=tiny_pretrained)


def test_official_names_at_sd_size_match_the_official_unet_layout():
    """At SD-1.x size (on the meta device: names only), the official names used above are those of the official
    UNetModel: input blocks [C | RT RT D | RT RT D | RT RT D | R R], middle [R T R], output blocks
    [R R RU | RT RT RTU | RT RT RTU | RT RT RT], a fuser in every T (16), and diffusers' converter maps them back."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import LDM_UNET_KEY, convert_ldm_unet_checkpoint

    from gligen.nn.grounded_unet import add_grounding

    with torch.device("meta"):
        unet = add_grounding(UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64))
    diffusers_sd = unet.state_dict()
    official = unet_to_official(diffusers_sd, unet.config)
    fusers = {k.split(".transformer_blocks")[0] for k in official if ".fuser." in k}
    assert fusers == {f"input_blocks.{i}.1" for i in (1, 2, 4, 5, 7, 8)} | {"middle_block.1"} | {
        f"output_blocks.{i}.1" for i in range(3, 12)
    }
    assert "input_blocks.1.1.transformer_blocks.0.fuser.linear.weight" in official
    assert {k for k in official if k.endswith(("op.weight", "conv.weight"))} == {
        "input_blocks.3.0.op.weight", "input_blocks.6.0.op.weight", "input_blocks.9.0.op.weight",
        "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight",
    }
    prefixed = {LDM_UNET_KEY + k: v for k, v in official.items() if not k.startswith("position_net.")}
    back = convert_ldm_unet_checkpoint(prefixed, dict(unet.config))
    assert set(back) == {k for k in diffusers_sd if not k.startswith("position_net.")}


def test_official_trainer_snapshot_keys_are_ignored_and_named(tmp_path, caplog):
    """The official trainer saves iters / opt / scheduler / ema beside the weights; official inference loads such a
    file (it reads 'model'), so the import does too, naming what it leaves out."""
    parts = {k: {"w": torch.zeros(1)} for k in ("model", "autoencoder", "text_encoder", "diffusion")}
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=5e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    torch.save({**parts, "iters": 7, "opt": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "ema": {"w": torch.ones(1)}}, tmp_path / "snapshot.pth")
    with caplog.at_level("WARNING"):
        loaded = load_official(tmp_path / "snapshot.pth")
    assert set(loaded) == set(parts) and torch.equal(loaded["model"]["w"], torch.zeros(1))
    assert "['iters', 'opt', 'scheduler', 'ema']" in caplog.text and "snapshot.pth" in caplog.text
