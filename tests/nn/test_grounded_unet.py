import pytest
import torch
from diffusers import UNet2DConditionModel

from gligen.nn.grounded_unet import add_grounding, fusers, set_beta, transformer_blocks


@pytest.fixture
def base_unet(tiny_pretrained):
    return UNet2DConditionModel.from_pretrained(tiny_pretrained, subfolder="unet").eval()


def unet_inputs(unet, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    size, width = unet.config.sample_size, unet.config.cross_attention_dim
    latents = torch.randn(batch, unet.config.in_channels, size, size, generator=g)
    timesteps = torch.randint(0, 1000, (batch,), generator=g)
    context = torch.randn(batch, 77, width, generator=g)
    gligen = {
        "boxes": torch.rand(batch, 30, 4, generator=g),
        "masks": (torch.rand(batch, 30, generator=g) > 0.5).float(),
        "positive_embeddings": torch.randn(batch, 30, width, generator=g),
    }
    return latents, timesteps, context, gligen


def run(unet, inputs, grounded=True):
    latents, timesteps, context, gligen = inputs
    kwargs = {"cross_attention_kwargs": {"gligen": gligen}} if grounded else {}
    with torch.no_grad():
        return unet(latents, timesteps, encoder_hidden_states=context, **kwargs).sample


def test_state_dict_matches_diffusers_gated_unet(base_unet):
    grounded = add_grounding(base_unet)
    reference = UNet2DConditionModel.from_config(base_unet.config, attention_type="gated")
    assert any(k.endswith("fuser.alpha_attn") for k in reference.state_dict())  # diffusers really built fusers
    ours = {k: tuple(v.shape) for k, v in grounded.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in reference.state_dict().items()}


def test_every_transformer_block_has_a_fuser_and_only_grounding_trains(base_unet):
    grounded = add_grounding(base_unet)
    assert len(list(fusers(grounded))) == len(list(transformer_blocks(grounded))) > 0
    trainable = {n for n, p in grounded.named_parameters() if p.requires_grad}
    assert trainable and all(".fuser." in n or n.startswith("position_net.") for n in trainable)
    assert all(n in trainable for n, _ in grounded.named_parameters() if ".fuser." in n or "position_net" in n)
    with pytest.raises(ValueError, match="already has fusers"):
        add_grounding(grounded)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zero_gamma_gives_exactly_the_frozen_unet(tiny_pretrained, base_unet, seed):
    inputs = unet_inputs(base_unet, seed=seed)
    expected = run(base_unet, inputs, grounded=False)
    grounded = add_grounding(UNet2DConditionModel.from_pretrained(tiny_pretrained, subfolder="unet").eval())
    torch.manual_seed(seed)
    for p in grounded.position_net.parameters():  # any grounding weights: gamma = 0 must still hide them
        p.data.normal_()
    assert torch.equal(run(grounded, inputs), expected)


@pytest.mark.parametrize("gamma", [0.3, 1.0])
def test_zero_beta_gives_exactly_the_frozen_unet_for_any_gamma(tiny_pretrained, base_unet, gamma):
    inputs = unet_inputs(base_unet)
    expected = run(base_unet, inputs, grounded=False)
    grounded = add_grounding(
        UNet2DConditionModel.from_pretrained(tiny_pretrained, subfolder="unet").eval(), gamma_init=gamma
    )
    assert not torch.allclose(run(grounded, inputs), expected)  # the gate is open ...
    set_beta(grounded, 0.0)
    assert torch.equal(run(grounded, inputs), expected)  # ... and beta = 0 closes it exactly


def test_saved_grounded_unet_runs_identically_in_diffusers(tmp_path, base_unet):
    grounded = add_grounding(base_unet, gamma_init=0.5)
    torch.manual_seed(0)
    for p in grounded.position_net.parameters():
        p.data.normal_(std=0.1)
    grounded.save_pretrained(tmp_path / "unet")
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    assert reloaded.config.attention_type == "gated"
    inputs = unet_inputs(grounded)
    assert torch.allclose(run(reloaded, inputs), run(grounded, inputs), atol=1e-5)
