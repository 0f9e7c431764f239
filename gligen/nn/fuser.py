"""The fuser: gated self-attention over visual + grounding tokens, inserted in every transformer block.

    v = v + beta * tanh(gamma_attn)  * TS(SelfAttn(norm1([v, linear(h_e)])))     # paper eq. (8)
    v = v + beta * tanh(gamma_dense) * FF(norm2(v))

TS keeps the visual tokens only. gamma is stored under the official names `alpha_attn` / `alpha_dense` so state
dicts match the official code and diffusers' `GatedSelfAttentionDense`; beta is not a parameter but a per-step
multiplier that the sampler sets (scheduled sampling).
"""

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from torch import nn

FUSER_TYPES = ("gated_self_attention", "gated_cross_attention", "ungated")


class Fuser(nn.Module):
    """GLIGEN's gated attention layer and its ablation variants.

    Args:
        query_dim: visual token width C.
        context_dim: grounding token width D.
        n_heads, d_head: attention heads (official: 8 heads of C/8).
        fuser_type: `gated_self_attention` (paper, default), `gated_cross_attention` (official variant: visual
            tokens attend to grounding tokens; no `linear`, keys/values read D directly) or `ungated` (self-attention
            added without the tanh gate, so it changes the frozen model from step 0; has no alpha parameters).
        gamma_init: start value of alpha_attn and alpha_dense. 0 (both codes) makes a fresh fuser the identity.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int,
        n_heads: int,
        d_head: int,
        fuser_type: str = "gated_self_attention",
        gamma_init: float = 0.0,
    ):
        super().__init__()
        if fuser_type not in FUSER_TYPES:
            raise ValueError(f"fuser_type must be one of {FUSER_TYPES}, got {fuser_type!r}")
        self.fuser_type = fuser_type
        if fuser_type == "gated_cross_attention":
            self.attn = Attention(query_dim=query_dim, cross_attention_dim=context_dim, heads=n_heads, dim_head=d_head)
        else:
            # grounding tokens are projected to the visual width so both can be concatenated
            self.linear = nn.Linear(context_dim, query_dim)
            self.attn = Attention(query_dim=query_dim, heads=n_heads, dim_head=d_head)
        self.ff = FeedForward(query_dim, activation_fn="geglu")
        self.norm1 = nn.LayerNorm(query_dim)
        self.norm2 = nn.LayerNorm(query_dim)
        if fuser_type != "ungated":
            self.alpha_attn = nn.Parameter(torch.tensor(float(gamma_init)))
            self.alpha_dense = nn.Parameter(torch.tensor(float(gamma_init)))
        self.beta = 1.0

    def gates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The effective gates (tanh(gamma) for gated variants, 1 for `ungated`), before beta."""
        if self.fuser_type == "ungated":
            one = self.norm1.weight.new_ones(())
            return one, one
        return self.alpha_attn.tanh(), self.alpha_dense.tanh()

    def forward(self, x: torch.Tensor, objs: torch.Tensor) -> torch.Tensor:
        if self.beta == 0:
            return x  # scheduled sampling switched grounding off: skip the compute, output is exactly the base
        gate_attn, gate_dense = self.gates()
        if self.fuser_type == "gated_cross_attention":
            h = self.attn(self.norm1(x), encoder_hidden_states=objs)
        else:
            n_visual = x.shape[1]
            h = self.attn(self.norm1(torch.cat([x, self.linear(objs)], dim=1)))[:, :n_visual]
        x = x + (self.beta * gate_attn) * h
        x = x + (self.beta * gate_dense) * self.ff(self.norm2(x))
        return x
