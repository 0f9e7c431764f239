import math

import pytest
import torch

from gligen.nn.fuser import Fuser


def make(fuser_type="gated_self_attention", gamma_init=0.0):
    torch.manual_seed(0)
    return Fuser(query_dim=16, context_dim=12, n_heads=4, d_head=4, fuser_type=fuser_type, gamma_init=gamma_init)


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 9, 16, generator=g), torch.randn(2, 5, 12, generator=g)


def test_official_parameter_names_and_shapes():
    shapes = {k: tuple(v.shape) for k, v in make().state_dict().items()}
    assert shapes == {
        "linear.weight": (16, 12), "linear.bias": (16,),
        "attn.to_q.weight": (16, 16), "attn.to_k.weight": (16, 16), "attn.to_v.weight": (16, 16),
        "attn.to_out.0.weight": (16, 16), "attn.to_out.0.bias": (16,),
        "ff.net.0.proj.weight": (128, 16), "ff.net.0.proj.bias": (128,),  # GEGLU: C -> 2 * 4C
        "ff.net.2.weight": (16, 64), "ff.net.2.bias": (16,),
        "norm1.weight": (16,), "norm1.bias": (16,), "norm2.weight": (16,), "norm2.bias": (16,),
        "alpha_attn": (), "alpha_dense": (),
    }


@pytest.mark.parametrize("gamma", [0.0, 0.25, 1.0, -0.5])
def test_gamma_init_sets_tanh_gates(gamma):
    attn, dense = make(gamma_init=gamma).gates()
    assert attn.item() == pytest.approx(math.tanh(gamma)) and dense.item() == pytest.approx(math.tanh(gamma))


def test_zero_gamma_is_identity_and_nonzero_gamma_is_not():
    x, objs = inputs()
    assert torch.equal(make(gamma_init=0.0)(x, objs), x)
    assert not torch.allclose(make(gamma_init=0.5)(x, objs), x)


def test_zero_beta_is_identity_for_any_gamma():
    x, objs = inputs()
    fuser = make(gamma_init=1.0)
    fuser.beta = 0.0
    assert torch.equal(fuser(x, objs), x)


@pytest.mark.parametrize("fuser_type", ["gated_self_attention", "gated_cross_attention", "ungated"])
@pytest.mark.parametrize("beta", [0.5, 0.3, 2.0])
def test_fractional_beta_scales_the_residual(fuser_type, beta):
    x, objs = inputs()
    fuser = make(fuser_type, gamma_init=0.7)
    # isolate the attention residual: with the dense branch off the output is x + beta * gate * h exactly
    if fuser_type == "ungated":
        fuser.ff.net[2].weight.data.zero_(), fuser.ff.net[2].bias.data.zero_()
    else:
        fuser.alpha_dense.data.zero_()
    full = fuser(x, objs) - x
    fuser.beta = beta
    scaled = fuser(x, objs) - x
    assert torch.allclose(scaled, beta * full, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(full, torch.zeros_like(full))


def test_gated_cross_attention_reads_grounding_tokens_directly():
    fuser = make("gated_cross_attention", gamma_init=0.5)
    names = set(fuser.state_dict())
    assert "linear.weight" not in names and "alpha_attn" in names
    assert fuser.attn.to_k.weight.shape == (16, 12)
    x, objs = inputs()
    out = fuser(x, objs)
    assert out.shape == x.shape and not torch.allclose(out, x)


def test_ungated_has_no_gate_parameters_and_changes_output_from_start():
    fuser = make("ungated")
    assert "alpha_attn" not in dict(fuser.named_parameters())
    x, objs = inputs()
    assert not torch.allclose(fuser(x, objs), x)


def test_unknown_fuser_type_is_refused():
    with pytest.raises(ValueError, match="fuser_type"):
        make("gated_everything")
